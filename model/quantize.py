"""Weight-only quantization: int8 with one scale per output channel, int4 with group scales.

A kernel [*in, *out] (one layer's; the stacked [layers, ...] kernels are quantized
layer by layer) is read as a matrix whose rows are its input axes flattened and
whose columns are its output channels. int8 keeps one absmax scale per output
channel, `scale [*out]`; int4 one per `group_size` consecutive rows and output
channel, `scale [in_size / group_size, *out]`. Values are `round(w / scale)` clipped
to +-127 (+-7), so dequantizing (`q * scale`) is off by at most half a step; an
all-zero column gets a tiny scale instead of a division by zero.

The model (model/layers.py) stores the integers and the float32 scales as params
and dequantizes each kernel just before its matmul, so weights stay int8/int4 in
memory. compress.py writes them; nothing trains them.
"""

import jax.numpy as jnp
import numpy as np

BITS = {"int8": 8, "int4": 4}
DTYPES = {"int8": jnp.int8, "int4": jnp.int4}
TINY_SCALE = 1e-8  # the scale of an all-zero column: it dequantizes to zeros


def max_int(method: str) -> int:
    return 2 ** (BITS[method] - 1) - 1


def scale_shape(method: str, shape, num_in: int, group_size: int) -> tuple[int, ...]:
    """The scale of a kernel `shape` [*in, *out]: [*out] (int8) or [groups, *out] (int4)."""
    out = tuple(shape[num_in:])
    if method == "int8":
        return out
    return (int(np.prod(shape[:num_in])) // group_size, *out)


def scale_names(method: str, names, num_in: int) -> tuple[str, ...]:
    """Logical axis names of the scale: the kernel's output names (after the groups)."""
    out = tuple(names[num_in:])
    return out if method == "int8" else ("quant_groups", *out)


def _as_groups(w, num_in: int, group_rows: int):
    """[*in, *out] -> [groups, group_rows, *out]: the input axes flattened then split."""
    return w.reshape(-1, group_rows, *w.shape[num_in:])


def quantize(w, method: str, num_in: int, group_size: int = 128):
    """(integers of w's shape in int8/int4, float32 scale): one layer's kernel [*in, *out]."""
    in_size = int(np.prod(w.shape[:num_in]))
    rows = in_size if method == "int8" else group_size
    groups = _as_groups(jnp.asarray(w, jnp.float32), num_in, rows)
    limit = max_int(method)
    scale = jnp.max(jnp.abs(groups), axis=1) / limit
    scale = jnp.where(scale > 0, scale, TINY_SCALE)
    q = jnp.clip(jnp.round(groups / scale[:, None]), -limit, limit)
    q = q.reshape(w.shape).astype(DTYPES[method])
    return q, (scale[0] if method == "int8" else scale)


def dequantize(q, scale, num_in: int, dtype=jnp.float32):
    """The float kernel of (q, scale) from `quantize`, in `dtype`."""
    out_rank = q.ndim - num_in
    groups = 1 if scale.ndim == out_rank else scale.shape[0]
    scale = scale if scale.ndim > out_rank else scale[None]
    in_size = int(np.prod(q.shape[:num_in]))
    w = _as_groups(q.astype(jnp.float32), num_in, in_size // groups) * scale[:, None]
    return w.reshape(q.shape).astype(dtype)
