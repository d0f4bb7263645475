"""Reading a run's checkpoints for sampling, evaluation, export and fine-tuning.

`load_run` is the one way to load a run: the config it was trained with, the step and
its params on the caller's mesh, whatever mesh wrote them (a LoRA run's base and
adapters merged). sample.py and eval.py (`load_sampler`), train.init_from and the
export tools all load through it. Nothing here writes: a step that cannot be read is a
UserError naming it (resuming training sets such a step aside instead:
training/checkpoint.py).
"""

import contextlib
import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from checkpoints import lora
from checkpoints.layout import (
    checkpoints_dir,
    first_line,
    manager,
    model_differences,
    read_meta,
    tree_differences,
)
from errors import UserError
from model.config import ModelConfig
from model.sampler import Sampler, abstract_params
from model.transformer import Transformer
from paths import workdir_path
from sharding import logical_rules, make_mesh


def newest_step_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(newest checkpoint step, or `step` if given; its meta: step, model, config); reads no
    arrays, writes nothing."""
    directory = checkpoints_dir(workdir)
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    if not steps:
        raise UserError(
            f"--workdir={workdir!r} has no checkpoint (nothing in {directory}): train first "
            "(train.py) or import a model with tools/import_hf.py."
        )
    if step is not None and step not in steps:
        raise UserError(f"--step={step}: {directory} has no such step; it has {sorted(steps)}.")
    step = max(steps) if step is None else step
    try:
        return step, read_meta(directory, step)
    except Exception as error:  # noqa: BLE001 -- any failure to read is the same to the user
        raise UserError(
            f"Checkpoint step {step} in {directory} cannot be read ({first_line(error)})."
        ) from None


@contextlib.contextmanager
def _reading(workdir: str, step: int, what: str):
    """(checkpoints directory, manager) to read step `step`'s `what` with; any failure
    other than a UserError becomes one that names the step and `what`."""
    directory = checkpoints_dir(workdir)
    steps = manager(directory, create=False)
    try:
        yield directory, steps
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 -- any failure to read is the same to the user
        raise UserError(
            f"Checkpoint step {step} in {directory}: its {what} cannot be read "
            f"({first_line(error)})."
        ) from None
    finally:
        steps.close()


def _restore_params(steps, step: int, target):
    args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
    return steps.restore(step, args=args)["params"]


def load_params(workdir: str, step: int, abstract):
    """Step `step`'s params alone, restored onto the shardings that `abstract`
    (jax.ShapeDtypeStruct leaves with .sharding) carry; UserError if they do not fit.
    A LoRA run's step gives its base and adapters merged (checkpoints/lora.py)."""
    with _reading(workdir, step, "params") as (directory, steps):
        saved = steps.item_metadata(step)["params"].tree
        target = lora.restore_target(abstract, saved)
        differences = tree_differences(saved, target)
        if differences:
            raise UserError(
                f"Checkpoint step {step} in {directory} holds parameters of another shape than "
                f"the model config ({'; '.join(differences)})."
            )
        params = _restore_params(steps, step, target)
        if not lora.is_adapters(params):
            return params
        lora_values = read_meta(directory, step)["config"].get("lora", {})
        return lora.merged(workdir, params, abstract, lora_values, directory / str(step))


def load_adapters(workdir: str, step: int) -> dict:
    """A LoRA step's adapters (model/lora.py's tree, unscaled) as host numpy arrays;
    UserError for a step that holds a whole model or cannot be read."""
    with _reading(workdir, step, "adapters") as (directory, steps):
        saved = steps.item_metadata(step)["params"].tree
        if not lora.is_adapters(saved):
            raise UserError(
                f"Checkpoint step {step} in {directory} holds a whole model, not LoRA adapters "
                "(the run trained with lora.rank=0); export it with tools/export_hf.py."
            )
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), saved
        )
        return jax.tree.map(np.asarray, _restore_params(steps, step, target)["lora"])


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's checkpoint step, loaded: the config it was trained with, the step, its params
    (None when none were asked for)."""

    config: ml_collections.ConfigDict
    step: int
    params: Any

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config.model)


def load_run(
    workdir: str,
    step: int | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    abstract=None,
    model_fields: dict | None = None,
) -> Run:
    """Step `step` (default: the newest) of `workdir`: its config, the step and its params.

    The params are placed on `mesh` by the run's own sharding rules, or onto the
    shardings of `abstract`: ShapeDtypeStructs, or a function of the run's ModelConfig
    giving them (called before any array is read, so it may refuse the model). With
    neither, no array is read and `params` is None. With `model_fields` (the current
    ModelConfig's weight fields) a run of another model is refused, naming the fields.
    """
    step, meta = newest_step_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    run = Run(config, step, None)
    if mesh is not None:
        rules = logical_rules(config.get("sharding_rules", ""))
        abstract = abstract_params(Transformer(run.model_config), mesh, rules)
    elif callable(abstract):
        abstract = abstract(run.model_config)
    if abstract is None:
        return run
    problems = model_differences(meta.get("model", {}), model_fields or {})
    try:
        params = load_params(workdir, step, abstract)
    except UserError as error:
        if not problems:
            raise
        problems.append(str(error).rstrip("."))
    if problems:
        raise UserError(
            f"Checkpoint step {step} in {checkpoints_dir(workdir)} does not fit this config's "
            f"model ({'; '.join(problems)}). Use the model section of "
            f"{workdir_path(workdir) / 'config.json'}."
        )
    return dataclasses.replace(run, params=params)


def load_sampler(
    workdir: str, mesh_sizes, devices=None, step: int | None = None
) -> tuple[Sampler, Run]:
    """A Sampler with step `step` (default: the newest) of `workdir` on a mesh of `devices`
    (default: all), and the run it loaded."""
    run = load_run(workdir, step, mesh=make_mesh(mesh_sizes, devices))
    rules = run.config.get("sharding_rules", "")
    return Sampler(run.model_config, run.params, mesh_sizes, rules, devices), run
