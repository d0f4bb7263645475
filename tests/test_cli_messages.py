"""What a user sees from train.py: no library start-up chatter, and one `error:` line (no
traceback) for a config file that is not there and for a step that does not fit in memory."""

import glob
import logging
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

import startup
import train
from tests.test_train_loop import REPO, SMALL, small_config
from training import loop

# Lines meshlm logs through absl: `I1205 11:25:19.182181 1399 train.py:83] ...`, from its own files.
_OWN_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+\.py):\d+\] ")
_OWN_FILES = {
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
} - {"__init__.py"}


def run_train(*flags, workdir) -> subprocess.CompletedProcess:
    """train.py in a user's environment: not the tests' JAX_PLATFORMS=cpu, hidden CUDA devices
    or TensorFlow log level, so JAX and TensorFlow probe for accelerators as they would."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TF_CPP_MIN_LOG_LEVEL")
    }
    return subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )


def test_config_file_mistakes_are_one_line(tmp_path):
    no_get_config = tmp_path / "no_get_config.py"
    no_get_config.write_text("LEARNING_RATE = 1e-3\n")
    cases = {  # the command line -> what its one line says
        ("--config=configs/nonexistent.py", "--config.train.num_steps=3"): (
            f"error: --config=configs/nonexistent.py: no such file in {REPO}; give a config "
            "file, e.g. --config=configs/default.py"
        ),
        (f"--config={no_get_config}",): f"error: --config={no_get_config}: defines no get_config()",
        ("--config=configs/default.py", "--config.train.num_step=3"): (
            "error: unknown config field in the command line: 'num_step'"
        ),
    }
    for flags, expected in cases.items():
        result = run_train(*flags, workdir=tmp_path / "workdir")
        assert result.returncode == 1
        assert len(result.stdout.splitlines()) == 1, result.stdout  # nothing from the libraries
        assert result.stdout.startswith(expected), result.stdout
    assert not os.path.exists(tmp_path / "workdir")


def test_a_step_that_does_not_fit_is_refused_before_anything_is_allocated(tmp_path):
    """Over 1.9 TB per device: more than any host, so the real available memory refuses it."""
    huge = {"model.embed_dim": 65536, "model.mlp_dim": 262144, "model.num_heads": 4}
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **huge}.items()]
    result = run_train(*flags, workdir=tmp_path / "workdir")
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout[-3000:]
    assert re.match(
        r"error: the train step needs [\d.]+ GiB per device, more than the [\d.]+ GiB a device "
        r"has \((the host's available memory shared by 8 CPU devices|.*'s memory for JAX)\); "
        r"lower it with train.num_microbatches \(more\), data.seq_len, model.remat_policy=full, "
        r"model.loss_chunk_size or mesh.fsdp",
        lines[-1],
    ), result.stdout[-3000:]
    # Every line before it is meshlm's own log (the first: train.py's JAX and devices line):
    # no start-up lines from TensorFlow or JAX, no traceback.
    assert "train.py" in lines[0] and "JAX" in lines[0], lines[0]
    for line in lines[:-1]:
        match = _OWN_LOG_LINE.match(line)
        assert match and match.group(1) in _OWN_FILES, line
    assert not os.path.exists(tmp_path / "workdir")


def test_running_out_of_memory_anyway_is_one_line_of_advice(tmp_path, monkeypatch):
    """A device that runs out during the run (the estimate is XLA's; devices are shared)."""

    def allocate_a_petabyte(*args, **kwargs):  # a real failed allocation: RESOURCE_EXHAUSTED
        jnp.zeros(2**50, jnp.int8).block_until_ready()

    monkeypatch.setattr(loop, "train", allocate_a_petabyte)
    with pytest.raises(SystemExit) as exit_info:
        train.run(small_config(), str(tmp_path))
    assert re.fullmatch(
        r"error: a device ran out of memory \(RESOURCE_EXHAUSTED: Out of memory allocating "
        r"1125899906842624 bytes\.\); lower it with train.num_microbatches .*docs/MEMORY.md\)\.",
        str(exit_info.value.code),
    ), exit_info.value.code


def test_only_known_start_up_lines_are_dropped(capfd, caplog):
    with startup._stderr_without(startup._TENSORFLOW_START_UP):
        os.write(
            2,
            b"I0000 00:00:1.5 7 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
            b"GPU will not be used.\nE0000 00:00:1.6 7 any.cc:1] a real error\n",
        )
    assert capfd.readouterr().err == "E0000 00:00:1.6 7 any.cc:1] a real error\n"

    startup.quiet_start()
    xla_bridge = logging.getLogger("jax._src.xla_bridge")
    with caplog.at_level(logging.INFO):
        xla_bridge.info("Unable to initialize backend 'tpu': Failed to open libtpu.so")
        xla_bridge.warning("A Google TPU may be present on this machine, but ...")
    assert [r.getMessage() for r in caplog.records] == [
        "A Google TPU may be present on this machine, but ..."
    ]
