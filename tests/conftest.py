"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never take an accelerator.
# Token caches the tests prepare go to a directory of this session, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="meshlm-tests-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

# Make the repository root importable (model/, sharding/, data/, ...).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402, F401 -- reads its environment now, before the cache setting below

# The processes the tests start (train.py runs, the CLIs, multi-process runs, notebook
# kernels) keep their XLA compiles in one directory of this test process (each
# pytest-xdist worker has its own) and reuse each other's: many compile the same small train step, and a cached compile costs a fraction
# of a new one. This process imported JAX above, so it compiles as a user's would.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["XDG_CACHE_HOME"], "jax-compilation-cache"
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
