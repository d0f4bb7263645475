"""The train state's checkpoints: save, restore, resume, and what may resume from what.

A step holds the items of checkpoints/layout.py (params, opt_state, data, meta); a LoRA
run's steps hold its adapters, its base once (checkpoints/lora.py). Reading a run for
other tools is checkpoints/read.py; writing a params-only step, checkpoints/write.py.
The dropout RNG is a pure function of seed and step, so it needs nothing more.

What happens on restore, newest step first:
  * a step that cannot be read (truncated or corrupt files) is moved aside to
    `<workdir>/checkpoints_unreadable/` (never deleted) and the previous one is
    tried; every process takes the same decision, and one warning per step set
    aside names where it went and which step resumed;
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
A float16 run's loss-scale state (training/loss_scale.py) is saved in the step's meta as
exact JSON numbers; a step without one (saved without loss scaling, or before it existed)
resumes with the initial scale, and a run without loss scaling drops a saved one (logged).
A workdir that holds checkpoints is never silently trained from scratch.
"""

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

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
from model.lora import is_lora_tree
from paths import workdir_path
from training import loss_scale


@dataclasses.dataclass
class Restored:
    """What a checkpoint gave back; `opt_state` is None when a fresh one must be made,
    `data_state` None when the data starts from the beginning, `loss_scale` (loss_scale.to_json)
    None when the step holds none."""

    step: int
    params: Any
    opt_state: Any
    data_state: dict | None
    loss_scale: dict | None = None


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


class Checkpointer:
    """Saves and restores (state, data iterator state, config) at given steps."""

    def __init__(self, workdir: str, keep: int, async_save: bool):
        self.workdir = workdir
        self.directory = checkpoints_dir(workdir)
        self.quarantine = workdir_path(workdir) / "checkpoints_unreadable"
        self.manager = manager(
            self.directory, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.base_saved = False  # a LoRA run's base: written before its first step, or restored

    def save(self, step: int, state, data_state: dict, config: dict, model_config: dict) -> bool:
        """Starts saving `state` at `step` (in the background when async); False if not saved."""
        if is_lora_tree(state.params) and not self.base_saved:
            lora.save_base(self.workdir, state.params["base"])
            self.base_saved = True
        meta = {"step": step, "model": model_config, "config": config}
        if state.loss_scale is not None:
            meta["loss_scale"] = loss_scale.to_json(state.loss_scale)
        return self.manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(lora.stored(state.params)),
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
        Each unreadable step set aside on the way is one warning, once the outcome is known.
        """
        self._set_aside_steps = []  # (step, where it went, why) of each step set aside
        outcome = "not resuming (see the error)"
        try:
            restored = self._restore_newest(
                abstract_state, config, model_config, allow_optimizer_reset
            )
            outcome = (
                f"resuming from step {restored.step}" if restored else "no earlier step is readable"
            )
            return restored
        finally:
            for step, destination, why in self._set_aside_steps:
                logging.warning(
                    "Checkpoint step %d in %s cannot be read%s; moved it to %s; %s.",
                    step,
                    self.directory,
                    why,
                    destination,
                    outcome,
                )

    def _restore_newest(self, abstract_state, config, model_config, allow_optimizer_reset):
        """restore_latest's work: the newest step that reads and fits, setting aside the rest."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            ok, found = self._read(step, functools.partial(self._read_meta_and_layout, step))
            if not ok:
                continue
            meta, params_tree, opt_tree = found
            params_only = opt_tree is None
            self._check_same_model(step, meta, model_config)
            abstract_params = lora.stored(abstract_state.params)
            if tree_differences(params_tree, abstract_params):
                raise UserError(
                    f"Checkpoint step {step} in {self.directory} holds parameters of another "
                    f"shape ({'; '.join(tree_differences(params_tree, abstract_params))}). "
                    "Use a new --workdir."
                )
            fresh_optimizer = params_only or bool(
                tree_differences(opt_tree, abstract_state.opt_state)
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
            if lora.is_adapters(params):
                step_dir = self.directory / str(step)
                base = lora.load_base(self.workdir, abstract_state.params["base"], step_dir)
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
                loss_scale=meta.get("loss_scale"),
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
        meta = read_meta(self.directory, step)
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
        layout = "; ".join(tree_differences(opt_tree, abstract_state.opt_state))
        return UserError(
            f"Checkpoint step {step} in {self.directory} is readable, but its optimizer state "
            f"does not fit the current config ({layout}). Config fields changed since it was "
            f"written: {named}. Either restore the old values, use a new --workdir, or pass "
            "--config.checkpoint.allow_optimizer_reset=True to resume its params, step and data "
            "position with a fresh optimizer state."
        )

    def _set_aside(self, step: int, error: Exception | None):
        """Moves step `step` into the quarantine (process 0; the others wait for it)."""
        if error is not None:  # orbax's own message holds the whole TensorStore spec
            logging.debug("Checkpoint step %d: %s", step, first_line(error))
        destination = self.quarantine / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(destination)
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()
        why = "" if error is not None else " on another process"
        self._set_aside_steps.append((step, destination, why))

    def wait(self):
        """Blocks until any asynchronous save has fully reached the disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
