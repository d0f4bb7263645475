"""What a run pays before its first step: no TensorFlow for a run from a token cache, the
train step's compile kept in the user's cache directory for the next run, and a CPU's
matmul peak measured once per machine; and what every step pays on CPU: no page faults for
memory the previous step freed."""

import json
import os
import subprocess
import sys

import jax
import pytest

import startup
from data.pipeline import make_train_iterator
from tests.test_data_cache import _cache_config
from training import hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py's imports, a run's first train and eval batches from an existing token cache, and
# the tiny model's train step compiled; then a first use of TensorFlow through data.sources.
_RUN_FROM_A_CACHE = """
import json, sys
import ml_collections
import startup
startup.quiet_start()
import train
from data import pipeline, sources
from tests.helpers import tiny_config
from training.trainer import Trainer
data = ml_collections.ConfigDict(json.loads(sys.argv[1]))
next(pipeline.make_train_iterator(data, global_batch_size=2, seed=0))
next(iter(pipeline.make_eval_batches(data, global_batch_size=2)))
Trainer(tiny_config()).compile()
before = sorted(m for m in sys.modules if m.startswith("tensorflow"))
sources.tf.constant(1)
tf = sys.modules["tensorflow"]
print(json.dumps([before, [d.device_type for d in tf.config.get_visible_devices()]]))
"""


def test_a_run_from_a_token_cache_starts_without_tensorflow_and_caches_its_compile(tmp_path):
    data = _cache_config(tmp_path)
    make_train_iterator(data, global_batch_size=2, seed=0)  # prepares the cache (with TF)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "home"))
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the tests' own cache: this run uses a user's
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    done = subprocess.run(
        [sys.executable, "-c", _RUN_FROM_A_CACHE, data.to_json()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tensorflow_modules, tf_devices = json.loads(done.stdout.splitlines()[-1])
    assert tensorflow_modules == []
    assert tf_devices == ["CPU"]  # imported at its first use, with no accelerator visible
    compiled = os.listdir(tmp_path / "home" / "meshlm" / "jax")
    assert any(name.startswith("jit_step") for name in compiled), compiled


# A jitted gradient on one device whose outputs and temporaries are allocated at every call
# and freed after it (argv: keep or return, the blocks' side, the layers); prints the median
# page faults of 10 calls (a thread's first use of a heap faults it in once: a mean of 10 let
# one such call decide). Each layer maps [side, 16] to [side, side] and back: the blocks are
# large, the arithmetic small.
_FAULTS_PER_CALL = """
import resource, statistics, sys
import startup
if sys.argv[1] == "keep":
    startup.reuse_freed_memory()
import jax, jax.numpy as jnp
def loss(layers, x):
    for up, down in layers:
        x = jnp.tanh(x @ up) @ down
    return jnp.sum(x)
side, count, rank = int(sys.argv[2]), int(sys.argv[3]), 16
gradients = jax.jit(jax.grad(loss))
layers = [(jnp.ones((rank, side)) / rank, jnp.ones((side, rank)) / side)] * count
x = jnp.ones((side, rank))
for _ in range(3):
    jax.block_until_ready(gradients(layers, x))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(gradients(layers, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def test_memory_a_step_freed_is_reused_without_page_faults():
    # 36 MiB blocks: the test fails without the call and without its synchronous dispatch.
    # (A 4 MiB case faulted too erratically without the call on one VM, 0-6,800 faults per
    # call, to tell the two apart.)
    side, count = 3072, 2

    def faults_per_call(mode):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("MESHLM_KEEP_FREED_MEMORY", None)
        env.pop("GLIBC_TUNABLES", None)
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_PER_CALL, mode, str(side), str(count)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return float(done.stdout.splitlines()[-1])

    glibc_defaults = faults_per_call("return")
    if glibc_defaults < 1000:  # thousands of pages are freed and faulted in again per call
        pytest.skip(f"this machine's malloc keeps freed memory already ({glibc_defaults} faults)")
    assert faults_per_call("keep") < glibc_defaults / 3  # 10-30x fewer seen


def test_freed_memory_is_kept_only_for_cpu_steps_and_unless_turned_off(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(startup.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    monkeypatch.setattr(startup.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(startup.sys, "platform", "linux")
    for name in ("MESHLM_KEEP_FREED_MEMORY", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)

    def kept(**env):
        calls.clear()
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            startup.reuse_freed_memory()
        return list(calls)

    mib = 1 << 20
    expected = [  # mmap threshold, top pad, trim threshold, mmap max; synchronous dispatch
        (-3, 32 * mib), (-2, 64 * mib), (-1, 1024 * mib), (-4, 0),
        ("jax_cpu_enable_async_dispatch", False),
    ]
    assert kept(JAX_PLATFORMS="cpu") == expected
    assert kept(JAX_PLATFORMS="cpu", MESHLM_KEEP_FREED_MEMORY="0") == []
    assert kept(JAX_PLATFORMS="cuda,cpu") == []
    assert kept(JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.top_pad=0") == []
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(startup, "_ACCELERATOR_PLUGINS", ("json",))  # "installed"
    assert kept() == []
    monkeypatch.setattr(startup, "_ACCELERATOR_PLUGINS", ("no_such_plugin_module",))
    assert kept() == expected


def test_the_compilation_cache_is_on_unless_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert startup.compilation_cache_dir() == str(tmp_path / "meshlm" / "jax")
    monkeypatch.setenv("MESHLM_JAX_CACHE", "0")
    assert startup.compilation_cache_dir() is None
    monkeypatch.delenv("MESHLM_JAX_CACHE")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert startup.compilation_cache_dir() is None  # JAX uses the user's own directory


def test_a_measured_peak_is_remembered_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    monkeypatch.setattr(hardware, "_matmul_flops", lambda *a: measured.append(a) or 1e11)
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 1.0, 0.0, 0.0))
    assert hardware.measured_matmul_flops.__wrapped__("float32") == 1e11
    assert not (tmp_path / "meshlm" / hardware.PEAKS_FILE).exists()  # busy cores: not kept
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    hardware.measured_matmul_flops.__wrapped__("float32")
    calls = len(measured)
    assert hardware.measured_matmul_flops.__wrapped__("float32") == 1e11
    assert len(measured) == calls  # the second start reads it
    peaks = json.loads((tmp_path / "meshlm" / hardware.PEAKS_FILE).read_text())
    machine = f"{hardware.cpu_model()} x {os.cpu_count()} | {jax.devices()[0].device_kind}"
    assert list(peaks) == [f"{machine} | float32 | 2048^3 x 5"]
    hardware.measured_matmul_flops.__wrapped__("bfloat16")
    assert len(measured) > calls  # another dtype is measured

