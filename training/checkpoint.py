"""Checkpoints: an orbax CheckpointManager in `<workdir>/checkpoints`.

Each checkpoint step holds four items:

    params      the model parameters (orbax StandardSave)
    opt_state   the optimizer state
    data        every process's data iterator position (JSON)
    meta        the step, the resolved model config and the run's full config (JSON)

Params and optimizer state are separate items so that params alone can be
loaded (a fresh optimizer, sampling, export: `newest_step_meta` + `load_params`)
without reading the rest. The dropout RNG is a pure function of seed and step,
so it needs nothing more. A params-only step (`save_params`, written by
tools/import_hf.py) holds only params and meta, with `"params_only": true`. A LoRA
run's steps hold its adapters alone as params; its frozen base is written once to
`<workdir>/lora_base` (training/lora_checkpoint.py).

What happens on restore, newest step first:
  * a step that cannot be read (truncated or corrupt files) is moved aside to
    `<workdir>/checkpoints_unreadable/` (never deleted) and the previous one is
    tried; every process takes the same decision;
  * a readable step of another model (fields that change the weights differ) is
    refused with a message naming the fields;
  * a readable step whose optimizer state does not fit the current config (the
    optimizer chain changed) is refused with a message naming the config fields
    that changed and the ways forward, unless `checkpoint.allow_optimizer_reset`
    asks to resume its params, step and data position with a fresh optimizer state;
  * a params-only step resumes its params with a fresh optimizer state and the
    data from the start (logged);
  * otherwise it is restored onto the current mesh, and every config value that
    changed since it was written is logged as `field: old -> new`.
A workdir that holds checkpoints is never silently trained from scratch.
"""

import contextlib
import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from errors import UserError
from model.lora import is_lora_tree
from training import lora_checkpoint
from training.paths import workdir_path

ITEMS = ("params", "opt_state", "data", "meta")


@dataclasses.dataclass
class Restored:
    """What a checkpoint gave back; `opt_state` is None when a fresh one must be made,
    `data_state` None when the data starts from the beginning."""

    step: int
    params: Any
    opt_state: Any
    data_state: dict | None


def _gather_across_processes(value: dict) -> list[dict]:
    """Every process's JSON-able `value`, in process order (one entry per process)."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    length = multihost_utils.process_allgather(np.array([encoded.size]))
    padded = np.zeros(int(length.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)])) for row, n in zip(gathered, length.ravel())]


def _all_processes_ok(ok: bool) -> bool:
    """True only if `ok` on every process, so all take the same branch (no hang)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.array([int(ok)])).min())


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{"train": {"num_steps": 3}} -> {"train.num_steps": 3}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict, current: dict) -> list[str]:
    """`field: old -> new` for every field whose value differs between two config dicts."""
    saved, current = flatten_config(saved), flatten_config(current)
    return [
        f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


def _shapes(tree) -> dict:
    """Flat {path: (shape, dtype)} of arrays or orbax array metadata."""
    flat = ocp.tree.to_flat_dict(tree, sep="/")
    return {path: (tuple(x.shape), np.dtype(x.dtype)) for path, x in flat.items()}


def _tree_differences(saved, expected) -> list[str]:
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


def _checkpoints_dir(workdir: str) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def _manager(directory: epath.Path, params_handler=None, **options) -> ocp.CheckpointManager:
    handlers = {
        "params": params_handler or ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(**options)
    )


def _read_meta(directory: str, step: int) -> dict:
    """A step's meta item by plain file reads (no cross-process barrier)."""
    return ocp.JsonCheckpointHandler().restore(epath.Path(directory) / str(step) / "meta")


def save_params(workdir: str, params, config: dict, model_config: dict, step: int = 0) -> None:
    """Writes a params-only checkpoint (no optimizer state, no data position), e.g. an
    imported model; training from it starts with a fresh optimizer and the data from the start.

    Uncompressed, so that saving jax arrays takes next to no memory beyond the params
    (compressed: ~0.5x more, measured; weights barely compress). Steps restore alike.
    """
    manager = _manager(
        _checkpoints_dir(workdir),
        params_handler=ocp.PyTreeCheckpointHandler(use_compression=False),
        create=True,
        enable_async_checkpointing=False,
    )
    meta = {"step": step, "model": model_config, "config": config, "params_only": True}
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(params), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args)
    manager.close()


def newest_step_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(newest checkpoint step, or `step` if given; its meta: step, model, config); reads no
    arrays, writes nothing."""
    directory = _checkpoints_dir(workdir)
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
        return step, _read_meta(directory, step)
    except Exception as error:  # noqa: BLE001 -- any failure to read is the same to the user
        raise UserError(
            f"Checkpoint step {step} in {directory} cannot be read ({_first_line(error)})."
        ) from None


@contextlib.contextmanager
def _reading(workdir: str, step: int, what: str):
    """(checkpoints directory, manager) to read step `step`'s `what` with; any failure
    other than a UserError becomes one that names the step and `what`."""
    directory = _checkpoints_dir(workdir)
    manager = _manager(directory, create=False)
    try:
        yield directory, manager
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 -- any failure to read is the same to the user
        raise UserError(
            f"Checkpoint step {step} in {directory}: its {what} cannot be read "
            f"({_first_line(error)})."
        ) from None
    finally:
        manager.close()


def _restore_params(manager, step: int, target):
    args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
    return manager.restore(step, args=args)["params"]


def load_params(workdir: str, step: int, abstract_params):
    """Step `step`'s params alone, restored onto the shardings that `abstract_params`
    (jax.ShapeDtypeStruct leaves with .sharding) carry; UserError if they do not fit.
    A LoRA run's step gives its base and adapters merged (training/lora_checkpoint.py)."""
    with _reading(workdir, step, "params") as (directory, manager):
        saved = manager.item_metadata(step)["params"].tree
        target = lora_checkpoint.restore_target(abstract_params, saved)
        differences = _tree_differences(saved, target)
        if differences:
            raise UserError(
                f"Checkpoint step {step} in {directory} holds parameters of another shape than "
                f"the model config ({'; '.join(differences)})."
            )
        params = _restore_params(manager, step, target)
        if not lora_checkpoint.is_adapters(params):
            return params
        lora_values = _read_meta(directory, step)["config"].get("lora", {})
        step_dir = directory / str(step)
        return lora_checkpoint.merged(workdir, params, abstract_params, lora_values, step_dir)


def load_adapters(workdir: str, step: int) -> dict:
    """A LoRA step's adapters (model/lora.py's tree, unscaled) as host numpy arrays;
    UserError for a step that holds a whole model or cannot be read."""
    with _reading(workdir, step, "adapters") as (directory, manager):
        saved = manager.item_metadata(step)["params"].tree
        if not lora_checkpoint.is_adapters(saved):
            raise UserError(
                f"Checkpoint step {step} in {directory} holds a whole model, not LoRA adapters "
                "(the run trained with lora.rank=0); export it with tools/export_hf.py."
            )
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), saved
        )
        return jax.tree.map(np.asarray, _restore_params(manager, step, target)["lora"])


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


class Checkpointer:
    """Saves and restores (state, data iterator state, config) at given steps."""

    def __init__(self, workdir: str, keep: int, async_save: bool):
        self.workdir = workdir
        self.directory = _checkpoints_dir(workdir)
        self.quarantine = workdir_path(workdir) / "checkpoints_unreadable"
        self.manager = _manager(
            self.directory, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.base_saved = False  # a LoRA run's base: written before its first step, or restored

    def save(self, step: int, state, data_state: dict, config: dict, model_config: dict) -> bool:
        """Starts saving `state` at `step` (in the background when async); False if not saved."""
        if is_lora_tree(state.params) and not self.base_saved:
            lora_checkpoint.save_base(self.workdir, state.params["base"])
            self.base_saved = True
        meta = {"step": step, "model": model_config, "config": config}
        return self.manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(lora_checkpoint.stored(state.params)),
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=ocp.args.JsonSave({"processes": _gather_across_processes(data_state)}),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(
        self,
        abstract_state,
        config: dict,
        model_config: dict,
        allow_optimizer_reset: bool = False,
    ) -> Restored | None:
        """The newest readable checkpoint that fits, or None if the workdir has none.

        `abstract_state` carries the *current* shardings, so a checkpoint written on
        another mesh is resharded onto this one. `config` is the current run's full
        config and `model_config` the fields of ModelConfig that change the weights.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            ok, found = self._read(step, functools.partial(self._read_meta_and_layout, step))
            if not ok:
                continue
            meta, params_tree, opt_tree = found
            params_only = opt_tree is None
            self._check_same_model(step, meta, model_config)
            abstract_params = lora_checkpoint.stored(abstract_state.params)
            if _tree_differences(params_tree, abstract_params):
                raise UserError(
                    f"Checkpoint step {step} in {self.directory} holds parameters of another "
                    f"shape ({'; '.join(_tree_differences(params_tree, abstract_params))}). "
                    "Use a new --workdir."
                )
            fresh_optimizer = params_only or bool(
                _tree_differences(opt_tree, abstract_state.opt_state)
            )
            if fresh_optimizer and not (params_only or allow_optimizer_reset):
                raise self._optimizer_mismatch(step, meta, config, opt_tree, abstract_state)
            items = {"params": ocp.args.StandardRestore(abstract_params)}
            if not fresh_optimizer:
                items["opt_state"] = ocp.args.StandardRestore(abstract_state.opt_state)
            if not params_only:
                items["data"] = ocp.args.JsonRestore()
            restore = functools.partial(
                self.manager.restore, step, args=ocp.args.Composite(**items)
            )
            ok, restored = self._read(step, restore)
            if not ok:
                continue
            data_state = None if params_only else self._data_state(step, restored["data"])
            params = restored["params"]
            if lora_checkpoint.is_adapters(params):
                step_dir = self.directory / str(step)
                base = lora_checkpoint.load_base(
                    self.workdir, abstract_state.params["base"], step_dir
                )
                params, self.base_saved = {"base": base, "lora": params["lora"]}, True
            if params_only:
                logging.info(
                    "Checkpoint step %d holds parameters only (e.g. tools/import_hf.py wrote it): "
                    "training starts from them with a fresh optimizer state and the data from the "
                    "start.",
                    step,
                )
            elif fresh_optimizer:
                logging.warning(
                    "checkpoint.allow_optimizer_reset: step %d's optimizer state does not fit the "
                    "current optimizer config; resuming its params, step and data position with a "
                    "fresh optimizer state.",
                    step,
                )
            for change in config_changes(meta.get("config", {}), config):
                logging.info("Config changed since checkpoint step %d: %s", step, change)
            return Restored(
                step=int(meta["step"]),
                params=params,
                opt_state=None if fresh_optimizer else restored["opt_state"],
                data_state=data_state,
            )
        return None

    def _data_state(self, step: int, data: dict) -> dict:
        """This process's data position, from the positions of all processes. Positions that
        are the same on every process (data.pipeline=cache) fit any process count."""
        processes = data["processes"]
        if len(processes) == jax.process_count():
            return processes[jax.process_index()]
        if all(p == processes[0] for p in processes):
            return processes[0]
        raise UserError(
            f"Checkpoint step {step} in {self.directory} was written by {len(processes)} "
            f"processes, but {jax.process_count()} are running; the data position cannot "
            "be split differently. Resume with the same number of processes."
        )

    def _read_meta_and_layout(self, step: int):
        """This process's own read of a step's metadata: plain file reads, no cross-process
        barrier, so a failure on one host cannot leave the others waiting in one. The
        optimizer layout is None for a params-only step."""
        meta = _read_meta(self.directory, step)
        layout = self.manager.item_metadata(step)
        params_only = meta.get("params_only", False)
        if layout.get("params") is None or (layout.get("opt_state") is None and not params_only):
            raise ValueError("params or opt_state item missing")
        return meta, layout["params"].tree, None if params_only else layout["opt_state"].tree

    def _read(self, step: int, read):
        """(True, read()) or, if any process failed to read, (False, None) with step set aside."""
        try:
            result, error = read(), None
        except Exception as e:  # noqa: BLE001 -- any failure to read sets the step aside
            result, error = None, e
        if _all_processes_ok(error is None):
            return True, result
        self._set_aside(step, error)
        return False, None

    def _check_same_model(self, step: int, meta: dict, model_config: dict):
        differences = model_differences(meta.get("model", {}), model_config)
        if differences:
            raise UserError(
                f"The workdir's checkpoints ({self.directory}, step {step}) belong to a different "
                f"model: {'; '.join(differences)}. Use a new --workdir, or restore the matching "
                "config values."
            )

    def _optimizer_mismatch(self, step, meta, config, opt_tree, abstract_state) -> UserError:
        changes = [
            c for c in config_changes(meta.get("config", {}), config) if c.startswith("optimizer.")
        ]
        named = "; ".join(changes) or "none of its optimizer fields (the code changed)"
        layout = "; ".join(_tree_differences(opt_tree, abstract_state.opt_state))
        return UserError(
            f"Checkpoint step {step} in {self.directory} is readable, but its optimizer state "
            f"does not fit the current config ({layout}). Config fields changed since it was "
            f"written: {named}. Either restore the old values, use a new --workdir, or pass "
            "--config.checkpoint.allow_optimizer_reset=True to resume its params, step and data "
            "position with a fresh optimizer state."
        )

    def _set_aside(self, step: int, error: Exception | None):
        reason = _first_line(error) if error else "another process could not read it"
        logging.warning(
            "Checkpoint step %d in %s cannot be read (%s); moving it to %s and trying the "
            "previous one.",
            step,
            self.directory,
            reason,
            self.quarantine,
        )
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(self.quarantine / f"{step}-{int(time.time())}")
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self):
        """Blocks until any asynchronous save has fully reached the disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
