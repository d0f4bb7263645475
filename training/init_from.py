"""train.init_from: a run that starts from another workdir's parameters (fine-tuning).

The initial workdir is any meshlm workdir with checkpoints: a pre-training run's,
or one written by tools/import_hf.py. Its params (step train.init_step, -1 = the
newest) are read straight onto the current mesh's shardings, whatever mesh
wrote them (checkpoints/read.py's load_run); the optimizer state, the step and
the data start fresh. It is used only while the run's own workdir holds no
checkpoint: once the run has saved, it resumes from its own checkpoints exactly
as pre-training does, and init_from is ignored (the loop logs that).
"""

from checkpoints.read import load_run
from errors import UserError
from paths import workdir_path
from training.checkpoint import Restored


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
    step = None if wanted < 0 else wanted
    try:
        run = load_run(path, step, abstract=abstract_params, model_fields=model_fields)
    except UserError as error:
        raise UserError(f"{where}, train.init_step={wanted}: {error}") from None
    return Restored(step=0, params=run.params, opt_state=None, data_state=None)
