"""train.py end to end: training, exact resume after SIGKILL, SIGTERM, bad checkpoints, errors."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.default import get_config
from errors import UserError
from training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default config, shrunk so a step takes milliseconds on 8 simulated devices.
SMALL = {
    "model.num_layers": 2,
    "model.embed_dim": 64,
    "model.num_heads": 4,
    "model.mlp_dim": 128,
    "model.max_seq_len": 32,
    "model.scan_unroll": 1,
    "data.seq_len": 32,
    "data.eval_max_batches": 2,
    "data.shuffle_buffer": 64,
    "train.global_batch_size": 8,
    "train.log_every": 1,
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 2,
}


def small_config(**overrides):
    config = get_config()
    for key, value in {**SMALL, **overrides}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def read_metrics(workdir) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run logs some steps again)."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                records[record["step"]] = record
    return records


def checkpoint_steps(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def start_train(workdir, **overrides) -> subprocess.Popen:
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_default_config_trains_end_to_end(tmp_path):
    workdir = str(tmp_path)
    result = loop.train(
        small_config(
            **{
                "train.num_steps": 30,
                "train.eval_every": 15,
                "checkpoint.every_steps": 15,
                "profile.start_step": 3,
                "profile.num_steps": 2,
            }
        ),
        workdir,
    )
    losses = [r["loss"] for _, r in sorted(read_metrics(workdir).items())]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses  # it learns
    assert np.isfinite(result["eval_loss"]) and result["eval_perplexity"] > 1
    assert checkpoint_steps(workdir) == [15, 30]
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["num_layers"] == 2
    record = read_metrics(workdir)[30]
    assert {"tokens_per_second", "mfu", "learning_rate", "grad_norm", "eta_seconds"} <= set(record)

    # The same workdir with a different model shape is refused, and nothing is overwritten.
    with pytest.raises(UserError, match=r"different model: model.num_layers: 2 -> 3"):
        loop.train(small_config(**{"model.num_layers": 3, "train.num_steps": 40}), workdir)
    assert checkpoint_steps(workdir) == [15, 30]


def test_exact_resume_after_sigkill(tmp_path):
    overrides = {"train.num_steps": 12, "checkpoint.every_steps": 3, "train.eval_every": 0}
    reference = str(tmp_path / "reference")
    assert start_train(reference, **overrides).wait() == 0
    expected = read_metrics(reference)

    workdir = str(tmp_path / "interrupted")
    process = start_train(workdir, **overrides)
    wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "6")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(read_metrics(workdir))
    assert killed_at < 12, "the run finished before it could be killed"

    resumed = start_train(workdir, **overrides)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "Restored checkpoint at step" in output
    actual = read_metrics(workdir)
    assert sorted(actual) == list(range(1, 13))
    for step in range(1, 13):  # bitwise: same params, optimizer state and data order
        assert actual[step]["loss"] == expected[step]["loss"], step


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    process = start_train(workdir, **{"train.num_steps": 100000, "checkpoint.every_steps": 0})
    wait_for(
        lambda: (
            os.path.exists(os.path.join(workdir, "metrics.jsonl"))
            and len(read_metrics(workdir)) >= 3
        ),
        process,
    )
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    reached = max(read_metrics(workdir))
    assert checkpoint_steps(workdir) == [reached]


def test_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path):
    workdir = str(tmp_path)
    config = small_config(
        **{"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0}
    )
    loop.train(config, workdir)
    assert checkpoint_steps(workdir) == [3, 6]
    for path in glob.glob(
        os.path.join(workdir, "checkpoints", "6", "params", "**", "*"), recursive=True
    ):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)

    config.train.num_steps = 8
    result = loop.train(config, workdir)
    assert result["step"] == 8
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_unreadable")))[0].startswith("6-")
    assert checkpoint_steps(workdir) == [3, 6, 8]  # step 6 written again, from the good step 3


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = small_config(
        **{
            "train.num_steps": 20,
            "checkpoint.every_steps": 2,
            "train.eval_every": 0,
            "optimizer.learning_rate": 1e12,
            "optimizer.grad_clip_norm": 0.0,
            "optimizer.warmup_steps": 0,
        }
    )
    with pytest.raises(loop.NonFiniteLossError, match=r"Non-finite loss .* at step (\d+)") as error:
        loop.train(config, workdir)
    failed_at = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(workdir).values())
    assert all(step < failed_at for step in checkpoint_steps(workdir))  # none holds NaNs

    config.train.skip_nonfinite_updates = True
    result = loop.train(config, str(tmp_path / "skipping"))
    assert result["step"] == 20


def test_losses_match_across_meshes(tmp_path):
    results = {}
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        workdir = str(tmp_path / "x".join(map(str, shape)))
        mesh = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), shape))
        loop.train(
            small_config(
                **{"train.num_steps": 4, "train.eval_every": 0, "checkpoint.every_steps": 0}, **mesh
            ),
            workdir,
        )
        results[shape] = [r["loss"] for _, r in sorted(read_metrics(workdir).items())]
    for shape, losses in results.items():
        np.testing.assert_allclose(losses, results[(8, 1, 1)], rtol=1e-5, err_msg=str(shape))


def test_profile_window_survives_resuming_inside_it(tmp_path):
    """Resumed at step 4 of a 3..5 window: nothing to stop, nothing raised, no trace."""
    window = loop._ProfileWindow(get_config().profile.copy_and_resolve_references(), str(tmp_path))
    window.start, window.stop = 3, 6
    for step in range(5, 9):  # the resumed run's steps
        window.before_step(step)
        window.after_step(step, state=None, last_step=step == 8)
    window.close()
    assert not window.active and not os.path.exists(window.directory)
