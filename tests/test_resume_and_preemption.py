"""Progress is never lost: config changes between runs, SIGTERM mid-evaluation, a truncated
checkpoint, honest timings."""

import glob
import json
import logging
import math
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from errors import UserError
from tests.test_train_loop import checkpoint_steps, read_metrics, small_config, start_train
from training import loop

FAST = {"train.eval_every": 0, "checkpoint.every_steps": 3, "train.num_steps": 3}


def saved_params(workdir, step):
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        item_handlers={"params": ocp.StandardCheckpointHandler()},
    )
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    return params["params"]


def test_a_changed_optimizer_structure_stops_the_run_and_keeps_every_checkpoint(tmp_path):
    workdir = str(tmp_path)
    loop.train(small_config(**FAST, **{"optimizer.grad_clip_norm": 1.0}), workdir)
    changed = small_config(**{**FAST, "train.num_steps": 6}, **{"optimizer.grad_clip_norm": 0.0})
    with pytest.raises(UserError) as error:
        loop.train(changed, workdir)
    message = str(error.value)
    assert "optimizer.grad_clip_norm: 1.0 -> 0.0" in message
    assert "allow_optimizer_reset" in message and "new --workdir" in message
    assert "\n" not in message
    assert checkpoint_steps(workdir) == [3]  # untouched, and not set aside
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))
    assert max(read_metrics(workdir)) == 3  # nothing trained from scratch

    # The documented way forward: the params, step and data position, a fresh optimizer.
    changed.checkpoint.allow_optimizer_reset = True
    result = loop.train(changed, workdir)
    assert result["step"] == 6
    assert checkpoint_steps(workdir) == [3, 6]
    assert sorted(read_metrics(workdir)) == list(range(1, 7))


def test_allow_optimizer_reset_starts_from_the_checkpoint_params(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    loop.train(small_config(**FAST, **{"optimizer.grad_clip_norm": 1.0}), workdir)
    expected = saved_params(workdir, 3)
    seen = {}
    original = loop.Trainer.resumed_state

    def spy(trainer, restored):
        state = original(trainer, restored)
        seen["params"], seen["step"] = jax.device_get(state.params), int(state.step)
        seen["counts"] = [  # Adam's update counts: zero in a fresh optimizer state
            int(x)
            for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "count" in jax.tree_util.keystr(path)
        ]
        return state

    monkeypatch.setattr(loop.Trainer, "resumed_state", spy)
    changed = small_config(
        **{**FAST, "train.num_steps": 4},
        **{"optimizer.grad_clip_norm": 0.0, "checkpoint.allow_optimizer_reset": True},
    )
    loop.train(changed, workdir)
    assert seen["step"] == 3 and seen["counts"] == [0]
    jax.tree.map(np.testing.assert_array_equal, seen["params"], expected)


def test_compatible_changes_resume_and_are_logged(tmp_path, caplog):
    workdir = str(tmp_path)
    loop.train(small_config(**FAST), workdir)
    changed = small_config(
        **{**FAST, "train.num_steps": 5, "train.global_batch_size": 16},
        **{"optimizer.learning_rate": 1e-3, "mesh.data": 4, "mesh.fsdp": 2},
    )
    with caplog.at_level(logging.INFO):
        result = loop.train(changed, workdir)
    assert result["step"] == 5
    logged = caplog.text
    assert "Restored checkpoint at step 3" in logged
    for change in (
        "train.num_steps: 3 -> 5",
        "train.global_batch_size: 8 -> 16",
        "optimizer.learning_rate: 0.003 -> 0.001",
        "mesh.data: -1 -> 4",
        "mesh.fsdp: 1 -> 2",
    ):
        assert change in logged, change


def test_a_truncated_checkpoint_is_one_warning_and_no_traceback(tmp_path):
    """train.py on a workdir whose newest step has a params file cut short: one warning line
    (the step, where it went, the step resumed) and no traceback. Orbax reads the arrays
    concurrently, and the reads abandoned when one failed used to print dozens of traceback
    lines ("Event loop is closed", ...) around a warning that held TensorStore's spec."""
    workdir = str(tmp_path)
    six = {**FAST, "train.num_steps": 6, "model.embed_dim": 256, "model.mlp_dim": 1024}
    loop.train(small_config(**six), workdir)  # wider arrays: more reads still in flight
    params = os.path.join(workdir, "checkpoints", "6", "params")
    files = glob.glob(os.path.join(params, "ocdbt.process_0", "d", "*"))
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)

    process = start_train(workdir, **{**six, "train.num_steps": 7})
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    (moved,) = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    warnings = [line for line in output.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"Checkpoint step 6 in {workdir}/checkpoints cannot be read; moved it to "
        f"{workdir}/checkpoints_unreadable/{moved}; resuming from step 3."
    ), warnings
    for noise in ("Traceback", "Exception ignored", "Event loop is closed", "never retrieved"):
        assert noise not in output, (noise, output[-3000:])
    assert checkpoint_steps(workdir) == [3, 6, 7]


def test_sigterm_during_evaluation_saves_before_exit(tmp_path, monkeypatch, caplog):
    """The signal arrives while the step-4 evaluation runs: step 4 must still be saved."""
    workdir = str(tmp_path)
    real_evaluate = loop.evaluate

    def evaluate_then_get_preempted(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's handler, mid-evaluation
        return real_evaluate(*args)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_get_preempted)
    config = small_config(
        **{"train.num_steps": 100, "train.eval_every": 4, "checkpoint.every_steps": 0}
    )
    with caplog.at_level(logging.INFO):
        result = loop.train(config, workdir)
    assert result["step"] == 4
    assert checkpoint_steps(workdir) == [4]
    assert "Preempted at step 4: checkpoint saved" in caplog.text


def test_step_times_leave_out_evaluation(tmp_path, monkeypatch):
    """Each train step takes 1 s and each evaluation 100 s on a fake clock: every logged
    step time must be 1 s (an evaluation at step 25 once made step 30's time 0.5 s)."""
    fake = {"now": 0.0}
    monkeypatch.setattr(loop, "now", lambda: fake["now"])
    real_evaluate = loop.evaluate

    def slow_evaluate(*args):
        fake["now"] += 100.0
        return real_evaluate(*args)

    class OneSecondSteps(loop.Trainer):
        def checked_train_step(self):  # the compiled step the loop runs
            step = super().checked_train_step()

            def timed_step(state, batch):
                fake["now"] += 1.0
                return step(state, batch)

            return timed_step

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    monkeypatch.setattr(loop, "Trainer", OneSecondSteps)
    config = small_config(
        **{
            "train.num_steps": 30,
            "train.log_every": 10,
            "train.eval_every": 25,
            "checkpoint.every_steps": 0,
            "train.z_loss_weight": 1e-2,
        }
    )
    loop.train(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert sorted(records) == [10, 20, 30]
    for step, record in records.items():
        assert record["step_time"] == pytest.approx(1.0), step
        assert record["tokens_per_second"] == pytest.approx(8 * 32), step
    # Perplexity is that of the cross-entropy, not of the loss with z-loss added.
    assert record["loss"] > record["cross_entropy"]
    assert record["perplexity"] == pytest.approx(math.exp(record["cross_entropy"]))
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if "eval_loss" in line]
    assert [e["step"] for e in evals] == [25, 30]
