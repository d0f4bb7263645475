"""Peak FLOP/s of the devices we train on, for MFU.

Accelerators: the vendor's dense bf16 peak per chip. CPUs (and anything not in
the table): measured once with a large jitted matmul in the compute dtype, so
CPU MFU is relative to what this machine's matmul actually reaches.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, matched against jax.Device.device_kind (lower case).
PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
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
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in sorted(PEAK_BF16_FLOPS, key=lambda row: -len(row[0])):  # "v5 lite" > "v5"
        if name in kind:
            return flops, f"{kind}: published dense bf16 peak"
    return measured_matmul_flops(dtype), f"{kind}: measured 2048^3 {dtype} matmul"
