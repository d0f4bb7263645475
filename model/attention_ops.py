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
"""

import jax
import jax.numpy as jnp


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
    if query_segment_ids is None:
        query_segment_ids = jnp.ones(key_segment_ids.shape[:1] + (q_len,), jnp.int32)
    if key_segment_ids is None:
        key_segment_ids = jnp.ones(query_segment_ids.shape[:1] + (k_len,), jnp.int32)
    same = query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]
    return causal & same


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int = 0,
    implementation: str = "xla",
) -> jax.Array:
    """[batch, q_len, heads, head_dim] attention output, in `query`'s dtype.

    "xla": the reference, `jax.nn.dot_product_attention` with a dense boolean mask
    (scores and softmax in float32); "cudnn": the same call with NVIDIA's fused kernel.
    """
    mask = attention_mask(
        query_segment_ids, key_segment_ids, query.shape[1], key.shape[1], query_offset
    )
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
