"""Peak FLOP/s of the devices we train on, for MFU.

Accelerators: the vendor's dense bf16 peak per chip. CPUs (and anything not in
the table): measured once with a large jitted matmul in the compute dtype, so
CPU MFU is relative to what this machine's matmul actually reaches.
"""

import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip. Each pattern must match jax.Device.device_kind
# (lower case) in full: the same chip name covers parts with different peaks (an H100
# PCIe card has 756 TFLOP/s, an H100 NVL 835, the SXM module 989).
PEAK_BF16_FLOPS = (
    (r"nvidia h100( 80gb hbm3| sxm5?.*)?", 989e12),  # SXM
    (r"nvidia h100 pcie", 756e12),
    (r"nvidia h100 nvl", 835e12),
    (r"nvidia h200( sxm.*)?", 989e12),
    (r"nvidia h200 nvl", 835e12),
    (r"nvidia a100.*", 312e12),  # SXM and PCIe, 40 and 80 GB
    (r"tpu v4", 275e12),
    (r"tpu v5 ?(lite|e)", 197e12),  # v5e
    (r"tpu v5p?", 459e12),
    (r"tpu v6 ?(lite|e)", 918e12),  # v6e (Trillium)
)


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
    """(peak FLOP/s of one device, which peak that is and where it comes from)."""
    kind = jax.devices()[0].device_kind.lower()
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.fullmatch(pattern, kind):
            return flops, f"{kind}: published dense bf16 peak, {flops / 1e12:.0f} TFLOP/s"
    flops = measured_matmul_flops(dtype)
    return (
        flops,
        f"{kind}: not in the table; measured 2048^3 {dtype} matmul, {flops / 1e12:.3g} TFLOP/s",
    )
