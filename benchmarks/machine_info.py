"""One line naming the machine a benchmark ran on, printed by every script in benchmarks/.

Timings are only comparable on the same CPU model under a similar load, so each benchmark
prints both itself rather than leaving them to the text that quotes it.
"""

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def allocator() -> str:
    """The malloc in use: a library in LD_PRELOAD (e.g. tcmalloc, README "Speed on CPU"), or
    the C library's (on CPU, XLA's step times depend on it)."""
    paths = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    preloaded = [os.path.basename(p) for p in paths]
    return ", ".join(preloaded) or "+".join(filter(None, platform.libc_ver())) or "libc"


def describe() -> str:
    """CPU model, core count, malloc and the 1-minute load average (other jobs sharing the
    cores)."""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"malloc {allocator()}, load average {os.getloadavg()[0]:.2f}"
    )
