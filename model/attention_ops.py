"""softmax(Q·Kᵀ/√d + mask)·V: the one attention computation, in interchangeable implementations.

Every implementation takes the same arguments and computes the same thing:

    query [batch, q_len, heads, head_dim], key/value [batch, k_len, kv_heads, head_dim]
    (kv_heads divides heads: grouped-query attention shares each KV head among
    heads // kv_heads query heads).

Query i sits at key index `query_offset + i` (0 in training, where the keys are
the queries' own tokens; the cache position while decoding). It attends to key j
if and only if

    j <= query_offset + i                    (causal)
    key_segment_ids[j] == query_segment_ids[i]   (same packed document)

Segment ids of None mean one segment. Padding is segment 0 and attends to other
padding only, so no row is ever fully masked and no NaN can appear.

Implementations (`model.attention_implementation`; memory per layer for b
sequences of t tokens, h heads):

    xla        the reference: dense [b, h, t, t] float32 scores and mask. Any backend.
    blockwise  flash-style tiles in plain JAX (model/blockwise_attention.py): memory
               linear in t for forward and backward. Any backend, any shape.
    cudnn      NVIDIA's fused kernel through jax.nn.dot_product_attention (GPU, bf16/f16).
               Its documented API has no segment ids: with packed documents the
               segment rule goes in as a [b, 1, t, t] mask (cuDNN adds it as a bias
               and returns its gradient), quadratic in t but not per head.
    splash     the TPU Pallas splash-attention kernel (model/splash_attention.py),
               with native segment ids: linear in t.

cudnn and splash take training shapes only (q_len == k_len at a static offset 0);
decoding shapes (a few queries at a traced offset over a KV cache) go to the
reference, which at one query per step is already linear in the cache length.
"""

import jax
import jax.numpy as jnp

from errors import UserError
from model.blockwise_attention import blockwise_attention
from model.splash_attention import splash_attention

DEFAULT_BLOCK_SIZE = 512


def attention_mask(
    query_segment_ids: jax.Array | None,
    key_segment_ids: jax.Array | None,
    q_len: int,
    k_len: int,
    query_offset: jax.Array | int = 0,
) -> jax.Array:
    """Boolean [batch or 1, 1, q_len, k_len] mask of the rule above."""
    query_index = query_offset + jnp.arange(q_len, dtype=jnp.int32)
    causal = (jnp.arange(k_len, dtype=jnp.int32)[None, :] <= query_index[:, None])[None, None]
    if query_segment_ids is None and key_segment_ids is None:
        return causal
    return causal & _segment_mask(query_segment_ids, key_segment_ids, q_len, k_len)


def _segment_mask(query_segment_ids, key_segment_ids, q_len, k_len):
    if query_segment_ids is None:
        query_segment_ids = jnp.ones(key_segment_ids.shape[:1] + (q_len,), jnp.int32)
    if key_segment_ids is None:
        key_segment_ids = jnp.ones(query_segment_ids.shape[:1] + (k_len,), jnp.int32)
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int = 0,
    implementation: str = "xla",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """[batch, q_len, heads, head_dim] attention output, in `query`'s dtype.

    `block_size`: queries and keys per tile of blockwise and splash attention.
    """
    args = (query, key, value, query_segment_ids, key_segment_ids)
    if implementation == "blockwise":
        return blockwise_attention(*args, query_offset, block_size)
    training_shape = query.shape[1] == key.shape[1] and _is_zero(query_offset)
    if implementation == "cudnn" and training_shape:
        return _cudnn(*args)
    if implementation == "splash" and training_shape:
        _require_backend("splash", "tpu", "a TPU")
        return splash_attention(*args, block_size)
    mask = attention_mask(
        query_segment_ids, key_segment_ids, query.shape[1], key.shape[1], query_offset
    )
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def _require_backend(implementation, backend, what):
    if jax.default_backend() != backend:
        raise UserError(
            f"model.attention_implementation={implementation} needs {what}, not "
            f"{jax.default_backend()}; use blockwise (any backend) or xla."
        )


def _cudnn(query, key, value, query_segment_ids, key_segment_ids):
    _require_backend("cudnn", "gpu", "an NVIDIA GPU")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"model.attention_implementation=cudnn needs model.dtype=bfloat16 or float16, "
            f"not {query.dtype}."
        )
    mask = None
    if query_segment_ids is not None or key_segment_ids is not None:
        length = query.shape[1]
        mask = _segment_mask(query_segment_ids, key_segment_ids, length, length)
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=True, implementation="cudnn"
    )
