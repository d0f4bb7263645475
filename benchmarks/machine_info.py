"""One line naming the machine a benchmark ran on, printed by every script in benchmarks/.

Timings are only comparable on the same CPU model under a similar load, so each benchmark
prints both itself rather than leaving them to the text that quotes it.
"""

import os
import platform


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its family, model number and
    widest vector unit; on ARM, which has no model name, the architecture with the
    implementer and part numbers; else what platform reports. Cloud VMs often name every
    CPU alike ("Intel(R) Xeon(R) Processor"); the numbers tell two generations apart."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields are enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    details = [f"{label} {fields[key]}" for key, label in _NUMBERS if key in fields]
    details += [unit for flag, unit in _VECTOR_UNITS if flag in flags][:1]
    return name + (f" ({', '.join(details)})" if details else "")


# /proc/cpuinfo's numbers that tell CPUs apart: x86's family and model, ARM's implementer
# and part (its cores' design, e.g. 0xd40 Neoverse V1).
_NUMBERS = (
    ("cpu family", "family"),
    ("model", "model"),
    ("CPU implementer", "implementer"),
    ("CPU part", "part"),
)
_VECTOR_UNITS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


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
