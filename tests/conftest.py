"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

# LLVM's optimizations are ~40% of the CPU time of each XLA compile, and the tests compile
# hundreds of small programs whose runs take milliseconds: they compile unoptimized (the same
# HLO, so the same shardings and buffers, and results equal to a few float32 ulps).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never take an accelerator.
# Token caches the tests prepare go to a directory of this session, not the user's ~/.cache.
# pytest-xdist's workers inherit the controller's environment and share its directory: a
# token cache takes seconds to prepare, once per run rather than once per worker (two
# processes preparing one at the same time is safe: data/prepare.py). Its maker removes it.
if "PYTEST_XDIST_WORKER" not in os.environ or "MESHLM_TESTS_CACHE" not in os.environ:
    os.environ["MESHLM_TESTS_CACHE"] = tempfile.mkdtemp(prefix="meshlm-tests-")
    atexit.register(shutil.rmtree, os.environ["MESHLM_TESTS_CACHE"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["MESHLM_TESTS_CACHE"]

# Make the repository root importable (model/, sharding/, data/, ...).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402 -- reads its environment now, before the cache setting below

# The processes the tests start (train.py runs, the CLIs, multi-process runs, notebook
# kernels) keep their XLA compiles in one directory of this test run (shared by the
# pytest-xdist workers, as the token caches are) and reuse each other's: many compile the same
# small train step, and a cached compile costs a fraction of a new one. The pytest processes
# use it too (JAX read its environment above, so it is set in its config): a file's second run
# of a config (a resume, a reference run) and a subprocess after an in-process run load their
# compiles (~20% of the CPU time of the checkpoint and resume tests).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["XDG_CACHE_HOME"], "jax-compilation-cache"
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _remember_a_matmul_peak() -> None:
    """Every train run reports MFU against the CPU's measured matmul peak. It is remembered in
    the cache directory only when the cores are idle (training/hardware.py), which they never
    are during the tests: each run would spend seconds of the suite measuring it. A fixed
    peak, in hardware's own file and key, stands for it (no test reads its value; the
    measuring itself is tested in test_startup.py and test_flops_and_peaks.py)."""
    from unittest import mock

    from training import hardware

    with mock.patch.object(hardware, "_matmul_flops", lambda *args: 1e11):
        with mock.patch.object(os, "getloadavg", lambda: (0.0, 0.0, 0.0)):
            for dtype in ("float32", "bfloat16", "float16"):
                hardware.measured_matmul_flops.__wrapped__(dtype)


_remember_a_matmul_peak()
