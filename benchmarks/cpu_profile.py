"""Where a jitted step's time goes on XLA:CPU, from a jax.profiler trace.

`profile(call, hlo_text)` traces a few calls and sums the kernel time of the compiled
program's own ops (trace events named after its HLO instructions) by kind over every
thread: with the wall time per call this says how busy the cores were, i.e. how much
of the step is the ops themselves and how much is cores waiting (one op too small to
spread over them, a device waiting for another at an all-reduce). Used by
benchmarks/vs_pytorch.py --profile.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax


def op_names(hlo_text: str) -> set:
    """The instruction names of an HLO module's text (compiled.as_text())."""
    return set(re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ", hlo_text, re.MULTILINE))


def profile(call, hlo_text: str, calls: int = 5) -> dict:
    """wall_ms per call, op_ms (the program's kernel time per call, summed over threads),
    cores_busy (op time over wall time x cores) and by_kind (ms per call of each op kind,
    the largest first)."""
    names = op_names(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            wall_ms = 1e3 * (time.perf_counter() - start) / calls
        (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    kinds = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            kinds[event["name"].split(".")[0]] += event["dur"] / 1e3 / calls  # µs -> ms
    op_ms = sum(kinds.values())
    return dict(
        wall_ms=wall_ms,
        op_ms=op_ms,
        cores_busy=op_ms / (wall_ms * os.cpu_count()),
        by_kind=dict(kinds.most_common()),
    )


def describe(result: dict, top: int = 6) -> str:
    largest = list(result["by_kind"].items())[:top]
    top = ", ".join(f"{kind} {ms:.1f}" for kind, ms in largest)
    return (
        f"traced {result['wall_ms']:.1f} ms/step; its ops {result['op_ms']:.1f} ms summed over "
        f"threads: cores {100 * result['cores_busy']:.0f}% busy; by kind (ms): {top}"
    )
