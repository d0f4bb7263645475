"""sweep.py: a sequential sweep end to end, dispatch commands, and vectorized == alone."""

import csv
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np

from configs.sweeps import grid, log_uniform, random_sample
from data.pipeline import make_train_iterator
from training import sweep_summary, sweeps, vectorized
from training.metrics import MetricsWriter
from training.sweep_summary import edge_warnings
from training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default config shrunk to seconds a trial (as in test_train_loop.py).
SMALL_CONFIG = """
from configs.default import get_config as default_config

def get_config():
    config = default_config()
    config.model.update(num_layers=2, embed_dim=64, num_heads=4, mlp_dim=128, max_seq_len=32,
                        scan_unroll=1)
    config.data.update(seq_len=32, eval_max_batches=2)
    config.train.update(num_steps=4, global_batch_size=8, log_every=1, eval_every=2)
    config.checkpoint.every_steps = 2
    config.optimizer.warmup_steps = 1
    return config
"""

# Two trials that train and one that fails validation (warmup longer than the run).
SWEEP = """
def get_sweep():
    return [{"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 1},
            {"optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 1},
            {"optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 99}]
"""


def sweep_cli(*args, fails=False) -> str:
    """sweep.py's stdout, or its stderr where it must fail."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "sweep.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (result.returncode != 0) == fails, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr if fails else result.stdout


def write_files(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_CONFIG)
    (tmp_path / "sweep_def.py").write_text(SWEEP)
    return str(tmp_path / "small.py"), str(tmp_path / "sweep_def.py")


def test_sequential_sweep_end_to_end(tmp_path):
    config, sweep_file = write_files(tmp_path)
    workdir = str(tmp_path / "sweep")
    args = [f"--config={config}", f"--sweep={sweep_file}", f"--workdir={workdir}", "--parallel=2"]
    sweep_cli(*args, "--config.train.num_steps=2")  # the base config's 4 steps, as train.py
    with open(os.path.join(workdir, "summary.csv")) as f:
        rows = {row["trial"]: row for row in csv.DictReader(f)}
    done = "learning_rate=0.001,warmup_steps=1"
    failed = "learning_rate=0.003,warmup_steps=99"
    assert rows[done]["status"] == "done" and float(rows[done]["final_eval_loss"]) > 0
    assert rows["learning_rate=0.003,warmup_steps=1"]["status"] == "done"
    assert rows[failed]["status"] == "failed"
    assert "optimizer.warmup_steps=99" in rows[failed]["error"]
    assert os.path.getsize(os.path.join(workdir, "summary.png")) > 0
    assert "| " + done in open(os.path.join(workdir, "summary.md")).read()
    for trial in (done, "learning_rate=0.003,warmup_steps=1"):
        assert sweeps.read_trial_config(os.path.join(workdir, trial))["train"]["num_steps"] == 2
        assert sweeps.read_metrics(os.path.join(workdir, trial))[-1]["step"] == 2

    # A rerun skips the finished trials (their metrics are not written again).
    metrics = os.path.join(workdir, done, "metrics.jsonl")
    before = open(metrics).read()
    assert f"skipped (done): {os.path.join(workdir, done)}" in sweep_cli(
        *args, "--config.train.num_steps=2"
    )
    assert open(metrics).read() == before

    # A rerun with other base overrides is refused: the finished trials ran with the first.
    error = sweep_cli(*args, "--config.train.num_steps=3", fails=True).strip()
    assert error == (
        f"error: {workdir}/sweep.json: the sweep ran with --config.train.num_steps=2, this rerun "
        "gives --config.train.num_steps=3; give the same --config.* overrides, or a new --workdir."
    )
    assert "no base overrides;" in sweep_cli(*args, fails=True)


def test_dispatch_prints_one_command_per_trial(tmp_path):
    config, sweep_file = write_files(tmp_path)
    common = [f"--config={config}", f"--sweep={sweep_file}", "--workdir=gs://bucket/sweep"]
    common.append("--config.train.num_steps=2")
    lines = sweep_cli(*common, "--dispatch=slurm").splitlines()
    assert len(lines) == 3 and all(line.startswith("sbatch ") for line in lines)
    base, trial = "--config.train.num_steps=2 ", "--config.optimizer.learning_rate="
    assert all(line.index(base) < line.index(trial) for line in lines)  # the trial's win
    assert "--config.optimizer.learning_rate=0.003" in lines[1]
    assert "--workdir=gs://bucket/sweep/learning_rate=0.003,warmup_steps=1" in lines[1]
    script = str(tmp_path / "tpu.sh")
    sweep_cli(*common, "--dispatch=tpu_vm", "--tpu_name=v4", f"--script={script}")
    commands = open(script).read().splitlines()[1:]
    assert len(commands) == 3 and all("--config.train.num_steps=2 " in c for c in commands)
    assert all("tpu-vm ssh v4 --worker=all" in c and "--distributed" in c for c in commands)


def load_small_config(tmp_path):
    config_path, _ = write_files(tmp_path)
    spec = importlib.util.spec_from_file_location("small_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_alone(config) -> list[dict]:
    """Each step's metrics from train.py's own Trainer, state and step, on one device."""
    config.mesh.update(data=1, fsdp=1, tensor=1)
    trainer = Trainer(config, devices=jax.devices()[:1])
    batches = make_train_iterator(
        config.data, seed=config.seed, global_batch_size=config.train.global_batch_size
    )
    state, records = trainer.init_state(), []
    for step in range(config.train.num_steps):
        state, metrics = trainer.train_step(state, trainer.to_global(next(batches)))
        records.append({k: float(metrics[k]) for k in COMPARED if k != "learning_rate"})
        records[-1]["learning_rate"] = float(trainer.schedule(step))
    return records


COMPARED = ("loss", "learning_rate", "grad_norm", "param_norm")

# Every field a vectorized sweep may vary, in every trial, each value unlike the base config's
# and the other trials': a field a trial ignored, or took from another field or trial, makes it
# differ from the same overrides trained alone (b1 != b2 everywhere, so a swap of the two shows).
VALUES = {
    "optimizer.learning_rate": (1e-2, 5e-3, 1e-3),
    "optimizer.warmup_steps": (4, 3, 0),
    "optimizer.weight_decay": (0.5, 0.0, 0.3),
    "optimizer.b1": (0.5, 0.7, 0.3),
    "optimizer.b2": (0.8, 0.5, 0.7),
    "optimizer.eps": (1e-2, 1e-4, 1e-3),
    "seed": (7, 8, 9),
}
VARIED = [{key: values[i] for key, values in VALUES.items()} for i in range(3)]

# The vectorized sweep's base overrides, each unlike small.py's (4 steps, evaluation, warmup 1,
# the default config's 2e-3).
BASE = {
    "train.num_steps": 5,
    "train.eval_every": 0,
    "optimizer.warmup_steps": 2,
    "optimizer.learning_rate": 3e-3,
}


def test_vectorized_trials_match_running_each_alone(tmp_path):
    """`sweep.py --vectorized` with base overrides: 3 trials on 8 devices (gcd 1: the whole mesh
    is fsdp inside each trial) give what each trial gives trained alone, base overrides taken."""
    assert sorted(VALUES) == sorted(vectorized.VECTORIZABLE)
    config_path, _ = write_files(tmp_path)
    (tmp_path / "varied.py").write_text(f"def get_sweep():\n    return {VARIED!r}\n")
    workdir = str(tmp_path / "vectorized")
    base = [f"--config.{key}={value}" for key, value in BASE.items()]
    sweep = f"--sweep={tmp_path / 'varied.py'}"
    sweep_cli(f"--config={config_path}", sweep, f"--workdir={workdir}", "--vectorized", *base)
    config = sweeps.apply_overrides(load_small_config(tmp_path), BASE)
    named = sweeps.name_trials(VARIED, "test")
    finals = set()
    for name, overrides in named.items():
        assert sweeps.read_trial_config(os.path.join(workdir, name))["train"]["num_steps"] == 5
        expected = train_alone(sweeps.apply_overrides(config, overrides))
        together = [r for r in sweeps.read_metrics(os.path.join(workdir, name)) if "loss" in r]
        assert [r["step"] for r in together] == [1, 2, 3, 4, 5]
        for key in COMPARED:
            np.testing.assert_allclose(
                [r[key] for r in together],
                [r[key] for r in expected],
                rtol=1e-5,
                err_msg=f"{name}: {key}",
            )
        finals.add(round(together[-1]["param_norm"], 4))
        assert sweeps.read_status(os.path.join(workdir, name))["status"] == "done"
    assert len(finals) == len(VARIED)  # the trials really differ


def small_sweep(config, num_trials: int):
    rates = [{"optimizer.learning_rate": 1e-3 * (i + 1)} for i in range(num_trials)]
    named = sweeps.name_trials(rates, "test")
    return vectorized._Sweep({n: sweeps.apply_overrides(config, o) for n, o in named.items()})


MESH1 = {"stage": 1, "data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


def test_vectorized_mesh_uses_every_device(tmp_path, caplog):
    config = load_small_config(tmp_path)  # global_batch_size=8, 8 devices
    assert dict(small_sweep(config, 3).mesh.shape) == dict(MESH1, fsdp=8)
    assert dict(small_sweep(config, 6).mesh.shape) == dict(MESH1, data=2, fsdp=4)
    assert "devices" not in caplog.text

    config.train.global_batch_size = 4  # 3 trials cannot split a batch of 4 over 8 devices
    assert dict(small_sweep(config, 3).mesh.shape) == dict(MESH1, fsdp=4)
    assert "3 trials use 4 of the 8 devices" in caplog.text
    assert "trial counts that are multiples of 2 use all of them" in caplog.text


def test_sweep_definitions_and_edge_warning():
    assert grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    space = {"optimizer.learning_rate": log_uniform(1e-4, 1e-2), "seed": [0, 1]}
    trials = random_sample(space, 5, seed=3)
    assert trials == random_sample(space, 5, seed=3)  # a rerun finds the same trial dirs
    assert all(1e-4 <= t["optimizer.learning_rate"] <= 1e-2 for t in trials)

    rows = [{"lr": lr, "best_eval_loss": loss} for lr, loss in [(1, 3.0), (2, 2.0), (4, 1.0)]]
    assert "lr=4 is the highest value tried" in edge_warnings(rows, ["lr"])[0]
    rows[2]["best_eval_loss"] = 5.0
    assert edge_warnings(rows, ["lr"]) == []


def test_a_summary_of_trials_that_set_different_fields(tmp_path):
    """A hand-written sweep whose trials override different fields: each plot shows the trials
    that set its field (the others have no value there, which once crashed the plot)."""
    named = {"lr": {"optimizer.learning_rate": 0.1}, "muon": {"optimizer.name": "muon"}}
    sweeps.write_sweep(str(tmp_path), named)
    for name, loss in (("lr", 1.5), ("muon", 1.25)):
        sweeps.write_status(str(tmp_path / name), "interrupted")  # makes the trial's directory
        writer = MetricsWriter(str(tmp_path / name))
        writer.write(1, {"loss": 2.0, "tokens_per_second": 10.0})
        writer.write(1, {"eval_loss": loss})
        writer.close()
        sweeps.write_status(str(tmp_path / name), "done")
    lines = sweep_summary.summarize(str(tmp_path))
    assert any("1.25" in line and "muon" in line for line in lines), lines
    assert (tmp_path / "summary.png").stat().st_size > 0
