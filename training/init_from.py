"""train.init_from: a run that starts from another workdir's parameters (fine-tuning).

The initial workdir is any meshlm workdir with checkpoints: a pre-training run's,
or one written by tools/import_hf.py. Its params (step train.init_step, -1 = the
newest) are read straight onto the current mesh's shardings, whatever mesh
wrote them (training/checkpoint.load_params); the optimizer state, the step and
the data start fresh. It is used only while the run's own workdir holds no
checkpoint: once the run has saved, it resumes from its own checkpoints exactly
as pre-training does, and init_from is ignored (the loop logs that).
"""

from errors import UserError
from training import checkpoint
from training.checkpoint import Restored
from training.paths import workdir_path


def initial_checkpoint(train_config, abstract_params, model_fields: dict) -> Restored:
    """The params of train.init_from as a params-only restore at step 0.

    `abstract_params` carry the current shardings; `model_fields` are the current
    ModelConfig's weight fields, which must equal the checkpoint's (named if not).
    """
    path, wanted = train_config.init_from, train_config.init_step
    where = f"train.init_from={path!r}"
    if not workdir_path(path).is_dir():
        raise UserError(
            f"{where}: no such directory; give a workdir written by train.py or tools/import_hf.py."
        )
    try:
        step, meta = checkpoint.newest_step_meta(path, None if wanted < 0 else wanted)
    except UserError as error:
        raise UserError(f"{where}, train.init_step={wanted}: {error}") from None
    problems = checkpoint.model_differences(meta.get("model", {}), model_fields)
    try:
        params = checkpoint.load_params(path, step, abstract_params)
    except UserError as error:
        problems.append(str(error).rstrip("."))
    if problems:
        raise UserError(
            f"{where}: step {step} does not fit this config's model ({'; '.join(problems)}). "
            f"Use the model section of {workdir_path(path) / 'config.json'} (configs/"
            "finetune_sft.py does), or another train.init_from."
        )
    return Restored(step=0, params=params, opt_state=None, data_state=None)
