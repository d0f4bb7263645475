"""Writing a params-only checkpoint step: a model that did not come from training here,
e.g. one tools/import_hf.py converted. Training steps are written by training/checkpoint.py."""

import orbax.checkpoint as ocp

from checkpoints.layout import checkpoints_dir, manager


def save_params(workdir: str, params, config: dict, model_config: dict, step: int = 0) -> None:
    """Writes a params-only checkpoint (no optimizer state, no data position), e.g. an
    imported model; training from it starts with a fresh optimizer and the data from the start.

    Uncompressed, so that saving jax arrays takes next to no memory beyond the params
    (compressed: ~0.5x more, measured; weights barely compress). Steps restore alike.
    """
    params_only = manager(
        checkpoints_dir(workdir),
        params_handler=ocp.PyTreeCheckpointHandler(use_compression=False),
        create=True,
        enable_async_checkpointing=False,
    )
    meta = {"step": step, "model": model_config, "config": config, "params_only": True}
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(params), meta=ocp.args.JsonSave(meta))
    params_only.save(step, args=args)
    params_only.close()
