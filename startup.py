"""What every command does first: a quiet start, and one error line for a bad --config.

Call `quiet_start()` at the top of an entry point, before JAX or TensorFlow is
imported. On a healthy CPU-only machine both libraries print start-up lines that
look like failures: TensorFlow (only the input pipeline here) its oneDNN banner,
"Could not find cuda drivers" and a failed cuInit, from C++ before its log level
applies; JAX "Unable to initialize backend 'tpu'" for a backend that is not
installed. Only those lines are dropped: JAX still warns when a GPU or TPU is
present but unusable, every other line of either library is kept, and JAX
still chooses its platforms itself (JAX_PLATFORMS is left to the user).
Orbax's INFO lines (every save and restore) are dropped too. It also keeps glibc's
malloc from giving each step's freed memory back to the kernel (`reuse_freed_memory()`).
"""

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import logging
import os
import platform
import re
import sys
import tempfile

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

REPO = os.path.dirname(os.path.abspath(__file__))
_GIVE_A_CONFIG = (
    "give a config file, e.g. --config=configs/default.py (the presets are in configs/)."
)

# TensorFlow's lines on a healthy machine without a GPU, written to file descriptor 2
# by its C++ libraries (two of them: each prints its own) while it loads.
_TENSORFLOW_START_UP = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on\."
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
)


def quiet_start(tensorflow: bool = False) -> None:
    """Silences the libraries' start-up lines and turns on the persistent compilation cache;
    `tensorflow=True` also imports TensorFlow now (see `import_tensorflow()`), where a command
    would otherwise import it lazily, at its first use."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's INFO and WARNING lines; errors stay
    logging.getLogger("jax._src.xla_bridge").addFilter(_not_a_missing_backend)
    absl_logging.get_absl_handler().addFilter(_not_orbax_info)
    use_compilation_cache()
    reuse_freed_memory()
    if tensorflow:
        import_tensorflow()


@functools.cache
def import_tensorflow():
    """TensorFlow, imported at the first call (~5 s, so only the code that reads data with it
    calls this), without its start-up lines, and with no accelerator visible to it: it must
    never take the GPU/TPU that JAX trains on (it would claim its memory)."""
    with _stderr_without(_TENSORFLOW_START_UP):
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
            tf.config.set_visible_devices([], "TPU")
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass
    return tf


class LazyTensorFlow:
    """`tf = LazyTensorFlow()` at the top of a module: TensorFlow (or `name`, a library built
    on it) imported through `import_tensorflow()` at the first attribute read, so that
    importing the module (e.g. for a run that reads a token cache) does not start it."""

    def __init__(self, name: str = "tensorflow"):
        self._name = name

    def __getattr__(self, attribute: str):
        import_tensorflow()
        return getattr(importlib.import_module(self._name), attribute)


def user_cache_dir(name: str) -> str:
    """~/.cache/meshlm/<name> (under $XDG_CACHE_HOME if set): token caches, compiled
    programs, measured peaks; anything there can be deleted and is remade."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "meshlm", name)


def compilation_cache_dir() -> str | None:
    """Where JAX keeps compiled programs between runs: user_cache_dir("jax"); None with
    MESHLM_JAX_CACHE=0 (off), or when JAX_COMPILATION_CACHE_DIR names a directory itself
    (JAX then uses that one)."""
    if os.environ.get("MESHLM_JAX_CACHE", "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    return user_cache_dir("jax")


def use_compilation_cache() -> None:
    """A second run of the same config loads its train step instead of compiling it (~4 s of
    the default config's start on a 2-core CPU). Every program that took over 0.1 s to
    compile is kept, so the train and eval steps are (JAX's default, 1 s, misses the small
    models' steps). Runs sharing it at once are safe: an entry read while another process
    writes it is a miss (JAX warns and compiles)."""
    directory = compilation_cache_dir()
    if directory is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


# mallopt(3)'s parameters: glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def reuse_freed_memory() -> None:
    """Keeps glibc's malloc from returning freed memory to the kernel between CPU steps.

    On a CPU backend each run of a compiled step allocates its temporaries and outputs anew
    and frees them when it ends. glibc gives freed memory back to the kernel, so the next
    step faults every page of it in again, zeroed: the baby-GPT step on one CPU device took
    ~12,700 page faults and ~24 ms of kernel time per 46 ms step, the default config's
    ~53,000 and ~90 ms per ~210 ms (BENCHMARKS.md, "Freed memory"). So glibc keeps what it
    frees: a 64 MiB top pad, a 1 GiB trim threshold, and no block mapped on its own (blocks
    up to 32 MiB come from a heap anyway). The price: the process keeps up to 1 GiB of freed
    memory for the next step. A worker thread's heap cannot hold a block over 64 MiB, so a
    one-device program is also run on the calling thread (JAX's synchronous CPU dispatch;
    a program over several devices is not affected), whose heap can. tcmalloc, preloaded
    (README, "Speed on CPU"), keeps every block by itself.

    Only where the steps run on the CPU: not when JAX_PLATFORMS names another platform
    first, nor, without it, when a GPU or TPU plugin is installed. Not with
    MESHLM_KEEP_FREED_MEMORY=0, nor when GLIBC_TUNABLES sets malloc itself; a no-op outside
    64-bit Linux with glibc. Under a preloaded allocator mallopt is that allocator's
    (tcmalloc's ignores it). Call it before JAX starts its CPU client (the first
    computation or `jax.devices()`), as `quiet_start` does.
    """
    if os.environ.get("MESHLM_KEEP_FREED_MEMORY", "1") == "0" or not _steps_run_on_cpu():
        return
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or sys.maxsize < 2**32:
        return
    mallopt = ctypes.CDLL(None).mallopt
    for parameter, value in (
        (_M_MMAP_THRESHOLD, 32 << 20),
        (_M_TOP_PAD, 64 << 20),
        (_M_TRIM_THRESHOLD, 1 << 30),
        (_M_MMAP_MAX, 0),
    ):
        mallopt(parameter, value)
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def _steps_run_on_cpu() -> bool:
    """Whether JAX will run on the CPU, decided before JAX starts (so without asking it)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def _not_a_missing_backend(record: logging.LogRecord) -> bool:
    """JAX logs at INFO each backend it knows but cannot load (libtpu on a GPU or CPU
    machine); where such hardware is present it warns as well, and that warning stays."""
    return not (
        record.levelno <= logging.INFO
        and record.getMessage().startswith("Unable to initialize backend")
    )


def _not_orbax_info(record: logging.LogRecord) -> bool:
    """Orbax logs every save and restore at INFO (~30 lines); its warnings and errors stay."""
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


@contextlib.contextmanager
def _stderr_without(pattern: re.Pattern):
    """Runs the block with file descriptor 2 (C++ writes there too) captured, then writes
    back every line that does not match `pattern`, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not pattern.search(line)))
            sys.stderr.flush()


class _ConfigFileParser(ConfigFileFlagParser):
    """Loads --config; a path that is not a file, or a file without get_config(), stops the
    command with one error line (ml_collections would defer the first to the config's first
    use, as two tracebacks)."""

    loaded = False  # get_config() ran: a KeyError or AttributeError after it is an override's

    def parse(self, path):
        file = path.split(":", 1)[0]  # ml_collections passes what follows ':' to get_config
        if not os.path.isfile(file):
            problem = "is a directory" if os.path.isdir(file) else "no such file"
            where = "" if os.path.isabs(file) else f" in {os.getcwd()}"
            raise SystemExit(f"error: --config={path}: {problem}{where}; {_GIVE_A_CONFIG}")
        try:
            config = super().parse(path)
        except AttributeError as error:
            if error.name != "get_config":
                raise  # a bug inside get_config(): its traceback says where
            raise SystemExit(f"error: --config={path}: defines no get_config(); {_GIVE_A_CONFIG}")
        self.loaded = True
        return config


def define_config_flag(help_string: str) -> flags.FlagHolder:
    """--config: a config file (default configs/default.py) with --config.<field>=<value>
    overrides; a missing file or an unknown field is one `error:` line (with `run`)."""
    try:  # with the default file, ml_collections applies the overrides here, at import
        holder = config_flags.DEFINE_config_file(
            "config", os.path.join(REPO, "configs/default.py"), help_string, lock_config=True
        )
    except (AttributeError, KeyError) as error:
        raise SystemExit(_unknown_field(error)) from None
    flags.FLAGS["config"].parser = _ConfigFileParser("config", lock_config=True)
    return holder


def run(main) -> None:
    """app.run(main), with an unknown --config.* field in the command line as one `error:`
    line (ml_collections raises it while absl parses the flags)."""
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        if "config" not in flags.FLAGS or not flags.FLAGS["config"].parser.loaded:
            raise  # not an override: a bug, e.g. in the config file's get_config()
        raise SystemExit(_unknown_field(error)) from None


def _unknown_field(error: Exception) -> str:
    inner = error.args[0] if error.args else error  # ml_collections wraps a KeyError
    message = str(inner.args[0] if isinstance(inner, KeyError) else inner).replace("\n", ". ")
    return f"error: unknown config field in the command line: {message}"
