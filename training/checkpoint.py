"""Checkpoints: an orbax CheckpointManager in `<workdir>/checkpoints`.

Each checkpoint holds the train state (params, optimizer state, step), the
data iterator position of every process, and metadata (the model config and
seed; the dropout RNG is a pure function of seed and step, so it needs nothing
more). Orbax writes into a temporary directory and renames it only once the
save is complete, so a crash mid-save never leaves a half-written step that
looks finished. A finished step that cannot be read (truncated on disk, say) is
moved aside to `<workdir>/checkpoints_unreadable/` — never deleted — and the
previous one is used.
"""

import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from errors import UserError


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


def _model_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class Checkpointer:
    """Saves and restores (state, data iterator state) at given steps."""

    # Fields that change only how a model is computed, not what its weights are:
    # a checkpoint may be resumed with different values of these.
    RUNTIME_FIELDS = (
        "dtype",
        "attention_implementation",
        "remat_policy",
        "scan_unroll",
        "dropout_rate",
    )

    def __init__(self, workdir: str, keep: int, async_save: bool):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.quarantine = os.path.join(os.path.abspath(workdir), "checkpoints_unreadable")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def save(self, step: int, state, data_state: dict, model_config: dict, seed: int):
        meta = {"step": step, "model": model_config, "seed": seed}
        self.manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"processes": _gather_across_processes(data_state)}),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, model_config: dict):
        """(state, this process's data state) of the newest readable checkpoint, or None.

        `abstract_state` carries the *current* shardings, so a checkpoint written on
        another mesh is resharded onto this one.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as error:  # noqa: BLE001 -- any unreadable step is set aside
                self._set_aside(step, error)
                continue
            self._check_compatible(meta["model"], model_config)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as error:  # noqa: BLE001
                self._set_aside(step, error)
                continue
            processes = restored["data"]["processes"]
            if len(processes) != jax.process_count():
                raise UserError(
                    f"Checkpoint step {step} in {self.directory} was written by {len(processes)} "
                    f"processes, but {jax.process_count()} are running; the data position cannot "
                    "be split differently. Resume with the same number of processes."
                )
            return restored["state"], processes[jax.process_index()]
        return None

    def _check_compatible(self, saved: dict, current: dict):
        differences = _model_differences(
            {k: v for k, v in saved.items() if k not in self.RUNTIME_FIELDS},
            {k: v for k, v in current.items() if k not in self.RUNTIME_FIELDS},
        )
        if differences:
            raise UserError(
                f"The workdir's checkpoints ({self.directory}) belong to a different model: "
                + "; ".join(differences)
                + ". Use a new --workdir, or restore the matching config values."
            )

    def _set_aside(self, step: int, error: Exception):
        logging.warning(
            "Checkpoint step %d in %s cannot be read (%s: %s); moving it to %s and "
            "trying the previous one.",
            step,
            self.directory,
            type(error).__name__,
            str(error).splitlines()[0][:200],
            self.quarantine,
        )
        if jax.process_index() == 0:
            os.makedirs(self.quarantine, exist_ok=True)
            shutil.move(
                os.path.join(self.directory, str(step)),
                os.path.join(self.quarantine, f"{step}-{int(time.time())}"),
            )
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self):
        """Blocks until any asynchronous save has fully reached the disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
