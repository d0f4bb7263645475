"""sweep.py: a sequential sweep end to end, dispatch commands, and vectorized == alone."""

import csv
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs.sweeps import grid, log_uniform, random_sample
from data.pipeline import make_train_iterator
from training import sweeps, vectorized
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


def sweep_cli(*args) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "sweep.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def write_files(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_CONFIG)
    (tmp_path / "sweep_def.py").write_text(SWEEP)
    return str(tmp_path / "small.py"), str(tmp_path / "sweep_def.py")


def test_sequential_sweep_end_to_end(tmp_path):
    config, sweep_file = write_files(tmp_path)
    workdir = str(tmp_path / "sweep")
    args = [f"--config={config}", f"--sweep={sweep_file}", f"--workdir={workdir}", "--parallel=2"]
    sweep_cli(*args)
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

    # A rerun skips the finished trials (their metrics are not written again).
    metrics = os.path.join(workdir, done, "metrics.jsonl")
    before = open(metrics).read()
    assert f"skipped (done): {os.path.join(workdir, done)}" in sweep_cli(*args)
    assert open(metrics).read() == before


def test_dispatch_prints_one_command_per_trial(tmp_path):
    config, sweep_file = write_files(tmp_path)
    common = [f"--config={config}", f"--sweep={sweep_file}", "--workdir=gs://bucket/sweep"]
    lines = sweep_cli(*common, "--dispatch=slurm").splitlines()
    assert len(lines) == 3 and all(line.startswith("sbatch ") for line in lines)
    assert "--config.optimizer.learning_rate=0.003" in lines[1]
    assert "--workdir=gs://bucket/sweep/learning_rate=0.003,warmup_steps=1" in lines[1]
    script = str(tmp_path / "tpu.sh")
    sweep_cli(*common, "--dispatch=tpu_vm", "--tpu_name=v4", f"--script={script}")
    commands = open(script).read().splitlines()[1:]
    assert len(commands) == 3
    assert all("tpu-vm ssh v4 --worker=all" in c and "--distributed" in c for c in commands)


def load_small_config(tmp_path):
    config_path, _ = write_files(tmp_path)
    spec = importlib.util.spec_from_file_location("small_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_alone(config, initial: dict) -> list[dict]:
    """Each step's loss and rate from train.py's own Trainer and step, on one device.

    `initial` caches the first trial's initial state: the rate does not change it, and
    its compile would otherwise be repeated for every trial."""
    config.mesh.update(data=1, fsdp=1, tensor=1)
    trainer = Trainer(config, devices=jax.devices()[:1])
    batches = make_train_iterator(
        config.data, seed=config.seed, global_batch_size=config.train.global_batch_size
    )
    if "state" not in initial:
        initial["state"] = trainer.init_state()
    state = jax.tree.map(jnp.copy, initial["state"])
    records = []
    for step in range(config.train.num_steps):
        state, metrics = trainer.train_step(state, trainer.to_global(next(batches)))
        records.append(
            {"loss": float(metrics["loss"]), "learning_rate": float(trainer.schedule(step))}
        )
    return records


def test_vectorized_trials_match_running_each_alone(tmp_path):
    config = load_small_config(tmp_path)
    config.train.update(num_steps=5, eval_every=0)
    config.optimizer.warmup_steps = 2
    rates = [1e-3, 3e-3, 1e-2, 3e-2]
    named = sweeps.name_trials([{"optimizer.learning_rate": r} for r in rates], "test")
    workdir = str(tmp_path / "vectorized")
    vectorized.run(config, workdir, named)
    final_losses, initial = set(), {}
    for name, overrides in named.items():
        expected = train_alone(sweeps.apply_overrides(config, overrides), initial)
        together = [r for r in sweeps.read_metrics(os.path.join(workdir, name)) if "loss" in r]
        assert [r["step"] for r in together] == [1, 2, 3, 4, 5]
        for key in ("loss", "learning_rate"):
            np.testing.assert_allclose(
                [r[key] for r in together], [r[key] for r in expected], rtol=1e-5, err_msg=name
            )
        final_losses.add(round(together[-1]["loss"], 4))
        assert sweeps.read_status(os.path.join(workdir, name))["status"] == "done"
    assert len(final_losses) == len(rates)  # the trials really trained with different rates


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
