"""Where a jitted step's time goes on XLA:CPU, from a jax.profiler trace.

`profile(call, hlo_text)` traces a few calls and sums the spans of the compiled program's
own ops (trace events named after its HLO instructions) by kind. A span is an op's wall
time on its device's thread: an op spread over the thread pool (a large dot) counts once,
for its span, however many cores it kept busy, and ops of two devices running at once
both count. (The process's CPU time says nothing more here: XLA's pool threads spin while
they wait for work, so one device and two both showed ~86 % of the cores busy.)
Used by benchmarks/vs_pytorch.py --profile.
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
    """wall_ms per traced call, op_ms (the op spans per call, summed) and by_kind (ms per
    call of each op kind, the largest first)."""
    names = op_names(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    kinds = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            kinds[event["name"].split(".")[0]] += event["dur"] / 1e3 / calls  # µs -> ms
    return dict(wall_ms=1e3 * wall / calls, op_ms=sum(kinds.values()),
                by_kind=dict(kinds.most_common()))


def describe(result: dict, top: int = 6) -> str:
    largest = ", ".join(f"{kind} {ms:.1f}" for kind, ms in list(result["by_kind"].items())[:top])
    return (
        f"traced {result['wall_ms']:.1f} ms/step; op spans {result['op_ms']:.1f} ms/step "
        f"summed, by kind (ms): {largest}"
    )
