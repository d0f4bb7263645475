"""Peak FLOP/s of the devices we train on, for MFU.

Accelerators: the vendor's dense bf16 peak per chip, looked up by the exact
`jax.Device.device_kind`. CPUs (and any kind not in the table): measured once with
a large jitted matmul in the compute dtype, so CPU MFU is relative to what this
machine's matmul actually reaches. Matching is exact, not by prefix, because one
chip name covers parts with different peaks (H100 SXM 989, NVL 835, PCIe 756
TFLOP/s): an unlisted variant must be measured, not given a neighbour's peak.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

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


@functools.cache
def measured_matmul_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of a size x size x size matmul on the default device."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times))


def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device, which peak that is: the table row and value, or measured)."""
    kind = jax.devices()[0].device_kind
    found = table_peak(kind)
    if found:
        row, flops = found
        return flops, f"table row {row}: {flops / 1e12:.0f} TFLOP/s dense bf16 (device {kind!r})"
    flops = measured_matmul_flops(dtype)
    return (
        flops,
        f"measured: 2048^3 {dtype} matmul, {flops / 1e12:.3g} TFLOP/s "
        f"(device {kind!r} is not in the table)",
    )
