"""How a workdir's checkpoints are laid out, shared by every reader and writer.

`<workdir>/checkpoints/<step>/` holds four orbax items:

    params      the model parameters (orbax StandardSave)
    opt_state   the optimizer state
    data        every process's data iterator position (JSON)
    meta        the step, the resolved model config and the run's full config (JSON)

Params and optimizer state are separate items so that params alone can be read (a
fresh optimizer, sampling, export: checkpoints/read.py) without reading the rest. A
params-only step (checkpoints/write.py) holds only params and meta, with
`"params_only": true`. A LoRA run's steps hold its adapters alone as params; its
frozen base is written once to `<workdir>/lora_base` (checkpoints/lora.py).
"""

import asyncio
import functools
import os
import sys
import traceback

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from paths import workdir_path

_ORBAX_DIR = os.path.dirname(ocp.__file__)


def checkpoints_dir(workdir: str) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def manager(directory: epath.Path, params_handler=None, **options) -> ocp.CheckpointManager:
    """An orbax manager of the four items (`options`: CheckpointManagerOptions)."""
    drop_abandoned_read_reports()
    handlers = {
        "params": params_handler or ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(**options)
    )


def read_meta(directory: epath.Path, step: int) -> dict:
    """A step's meta item by plain file reads (no cross-process barrier)."""
    return ocp.JsonCheckpointHandler().restore(epath.Path(directory) / str(step) / "meta")


def _shapes(tree) -> dict:
    """Flat {path: (shape, dtype)} of arrays or orbax array metadata."""
    flat = ocp.tree.to_flat_dict(tree, sep="/")
    return {path: (tuple(x.shape), np.dtype(x.dtype)) for path, x in flat.items()}


def tree_differences(saved, expected) -> list[str]:
    """Up to three each of the missing, extra and reshaped arrays of `saved` against `expected`."""
    saved, expected = _shapes(saved), _shapes(expected)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    return (
        [f"{k} not in the checkpoint" for k in missing[:3]]
        + [f"{k} only in the checkpoint" for k in extra[:3]]
        + [f"{k}: {saved[k]} in the checkpoint, {expected[k]} now" for k in shapes[:3]]
    )


def model_differences(saved: dict, model_config: dict) -> list[str]:
    """`model.field: saved -> current` for each weight-changing model field that differs."""
    return [
        f"model.{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in model_config.items()
        if saved.get(k) != v
    ]


def first_line(error: BaseException) -> str:
    """`Type: first line` of the error's root cause: orbax wraps TensorStore's error in one
    that prints the whole TensorStore spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _abandoned_read(error: BaseException | None) -> bool:
    """True for what an abandoned orbax array read leaves behind (see below)."""
    if error is None:
        return False
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.filename.startswith(_ORBAX_DIR) for frame in frames)


@functools.cache
def drop_abandoned_read_reports() -> None:
    """Orbax reads a step's arrays concurrently and, when one read fails (a truncated
    file), closes its event loop with the others still running. Each of those then reports
    when it ends or is collected, long after the failure was handled: "Event loop is
    closed", the read's own exception (sys.unraisablehook), "exception was never
    retrieved" (asyncio's logger) -- dozens of traceback lines that read like a crash.
    Those reports are dropped, once for the process; every other one passes."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _abandoned_read(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    asyncio.log.logger.addFilter(
        lambda record: not (record.exc_info and _abandoned_read(record.exc_info[1]))
    )
