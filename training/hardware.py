"""Peak FLOP/s of the devices we train on, for MFU.

Accelerators: the vendor's dense bf16 peak per chip, looked up by the exact
`jax.Device.device_kind`. CPUs (and any kind not in the table): measured once with
large jitted matmuls in the forms the train step runs (`matmul_forms`), so CPU MFU
is relative to the fastest matmul this machine reaches on the step's inputs: the
step's logits and attention scores accumulate bfloat16 inputs in float32, which a
CPU with bfloat16 instructions runs ~5x faster than a bfloat16-output matmul
(1.4 against 0.27 TFLOP/s on the 2-core dev VM). Matching is exact, not by
prefix, because one chip name covers parts with different peaks (H100 SXM 989,
NVL 835, PCIe 756 TFLOP/s): an unlisted variant must be measured, not given a
neighbour's peak.
"""

import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks.machine_info import cpu_model
from startup import user_cache_dir

PEAKS_FILE = "measured_peaks.json"

# (table row, dense bf16 FLOP/s per chip, the device_kind strings jax reports for it).
# NVIDIA: the datasheets' sparse figures halved; Google: Cloud TPU system architecture pages.
PEAK_BF16_FLOPS = (
    ("H100 SXM", 989e12, ("NVIDIA H100 80GB HBM3",)),
    ("H100 NVL", 835e12, ("NVIDIA H100 NVL",)),
    ("H100 PCIe", 756e12, ("NVIDIA H100 PCIe",)),
    ("H200 SXM", 989e12, ("NVIDIA H200",)),
    ("H200 NVL", 835e12, ("NVIDIA H200 NVL",)),
    (
        "A100",  # SXM and PCIe have the same tensor-core peak
        312e12,
        (
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100-PCIE-40GB",
            "NVIDIA A100 80GB PCIe",
        ),
    ),
    ("TPU v4", 275e12, ("TPU v4",)),  # not "TPU v4 lite" (v4i)
    ("TPU v5e", 197e12, ("TPU v5 lite", "TPU v5e")),
    ("TPU v5p", 459e12, ("TPU v5", "TPU v5p")),
    ("TPU v6e", 918e12, ("TPU v6 lite", "TPU v6e")),
)


def table_peak(device_kind: str) -> tuple[str, float] | None:
    """(table row, FLOP/s) for exactly this device kind (case and outer spaces ignored)."""
    kind = device_kind.strip().lower()
    for row, flops, kinds in PEAK_BF16_FLOPS:
        if kind in (k.lower() for k in kinds):
            return row, flops
    return None


def matmul_forms(dtype: str) -> tuple[tuple[str, str, str], ...]:
    """(lhs, rhs, output) dtypes of the train step's matmuls in compute dtype `dtype`:
    Dense layers (all `dtype`), logits and attention scores (float32 output), and
    their gradients (a float32 cotangent times a `dtype` operand)."""
    forms = [(dtype, dtype, dtype), (dtype, dtype, "float32"), ("float32", dtype, "float32")]
    return tuple(dict.fromkeys(forms))


def _matmul_flops(form: tuple[str, str, str], size: int, repeats: int) -> float:
    """FLOP/s of the fastest of `repeats` size x size x size matmuls of `form` on the
    default device (a peak: a moment when another process holds a core must not lower it)."""
    lhs, rhs, out = form
    a, b = jnp.ones((size, size), lhs), jnp.ones((size, size), rhs)
    matmul = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=out))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


@functools.cache
def measured_matmul_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest matmul form the step runs in compute dtype `dtype`, measured
    once per machine (~0.5 s of every start on a CPU) and remembered in PEAKS_FILE under the
    user's cache directory, keyed by CPU model, core count, device kind and dtype; delete it
    to measure again. A peak measured while other work oversubscribes the cores (load
    average above the core count) is used but not remembered: it would inflate every later
    run's MFU."""
    machine = f"{cpu_model()} x {os.cpu_count()} | {jax.devices()[0].device_kind}"
    key = f"{machine} | {dtype} | {size}^3 x {repeats}"
    path = user_cache_dir(PEAKS_FILE)
    peaks = _read_json(path)
    if key in peaks:
        return peaks[key]
    flops = max(_matmul_flops(form, size, repeats) for form in matmul_forms(dtype))
    if os.getloadavg()[0] <= os.cpu_count():
        _write_json(path, {**peaks, key: flops})
    return flops


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_json(path: str, value: dict) -> None:
    """Written beside and renamed into place: processes starting at once never read half a
    file. A cache directory that cannot be written only costs the next start a measurement."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
            json.dump(value, f, indent=1)
        os.replace(f.name, path)
    except OSError:
        pass


def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device, which peak that is: the table row and value, or measured)."""
    kind = jax.devices()[0].device_kind
    found = table_peak(kind)
    if found:
        row, flops = found
        return flops, f"table row {row}: {flops / 1e12:.0f} TFLOP/s dense bf16 (device {kind!r})"
    flops = measured_matmul_flops(dtype)
    source = (
        f"measured: fastest 2048^3 matmul of {dtype} inputs, {flops / 1e12:.3g} TFLOP/s "
        f"(device {kind!r} is not in the table)"
    )
    # One CPU device's matmul runs on every core of the host: split into several devices
    # (JAX_NUM_CPU_DEVICES), the host's peak is shared between them. This assumes one
    # process per host (several processes on one host, tools/launch_local.py, share it too).
    shared = jax.local_device_count() if kind == "cpu" else 1
    if shared > 1:
        return flops / shared, f"{source}, shared by {shared} CPU devices"
    return flops, source
