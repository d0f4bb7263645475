"""softmax(Q·Kᵀ/√d + mask)·V: the one attention computation, in interchangeable implementations.

Every implementation takes the same arguments and computes the same thing:

    query [batch, q_len, heads, head_dim], key/value [batch, k_len, kv_heads, head_dim]
    (kv_heads divides heads: grouped-query attention shares each KV head among
    heads // kv_heads query heads).

Query i sits at key index `query_offset + i` (0 in training, where the keys are
the queries' own tokens; the cache position while decoding). With i' = query_offset + i
it attends to key j if and only if key_segment_ids[j] == query_segment_ids[i] (same
packed document) and, by `mask_kind` (`model.attention_mask`):

    causal          j <= i'
    bidirectional   always (masked LM)
    prefix          j <= i'  or  (query_prefix[i] and key_prefix[j])   (prefix LM, as t5x)

and, in a local layer (a sliding `window` > 0), |i' - j| < window.
Scores are q.k times `scale` (head_dim ** -0.5 unless given), soft-capped to
(-logit_cap, logit_cap) when logit_cap > 0 (Gemma 2), then masked.

The prefixes are the batch's `prefix_mask` (1 = the token is in its document's
bidirectional prefix); "prefix" without them (None) is causal. Segment ids of None
mean one segment. Padding is segment 0 and attends to other padding only, so no row
is ever fully masked and no NaN can appear.

Implementations (`model.attention_implementation`; memory per layer for b
sequences of t tokens, h heads):

    xla        the reference: dense [b, h, t, t] float32 scores and mask, in einsums
               (grouped_attention). Any backend.
    blockwise  flash-style tiles in plain JAX (model/blockwise_attention.py): memory
               linear in t for forward and backward. Any backend, any shape.
    cudnn      NVIDIA's fused kernel through jax.nn.dot_product_attention (GPU, bf16/f16).
               Its documented API has no segment ids or prefixes: its is_causal flag
               serves the causal mask only; packed documents (any mask) and the
               bidirectional and prefix rules go in as a [b, 1, t, t] mask (cuDNN adds
               it as a bias and returns its gradient), quadratic in t but not per head.
    splash     the TPU Pallas splash-attention kernel (model/splash_attention.py),
               with native segment ids: linear in t. Causal and bidirectional masks
               only: a per-row prefix is no static kernel mask, so "prefix" runs
               blockwise instead (logged once).

cudnn and splash take training shapes only (q_len == k_len at a static offset 0);
decoding shapes (a few queries at a traced offset over a KV cache) go to the
reference, which at one query per step is already linear in the cache length.
"""

import jax
import jax.numpy as jnp
from absl import logging

from errors import UserError
from model.blockwise_attention import Scores, blockwise_attention, visible
from model.splash_attention import splash_attention

DEFAULT_BLOCK_SIZE = 512


def attention_mask(
    query_segment_ids: jax.Array | None,
    key_segment_ids: jax.Array | None,
    q_len: int,
    k_len: int,
    query_offset: jax.Array | int = 0,
    mask_kind: str = "causal",
    query_prefix: jax.Array | None = None,
    key_prefix: jax.Array | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:
    """Boolean [batch or 1, 1, q_len, k_len] mask of the rule above."""
    one_segment = lambda length: jnp.ones((1, length), jnp.int32)
    if query_segment_ids is None:
        query_segment_ids = one_segment(q_len)
    if key_segment_ids is None:
        key_segment_ids = one_segment(k_len)
    if query_prefix is None and mask_kind == "prefix":
        mask_kind = "causal"
    mask = visible(
        query_offset + jnp.arange(q_len, dtype=jnp.int32),
        jnp.arange(k_len, dtype=jnp.int32),
        query_segment_ids,
        key_segment_ids,
        query_prefix,
        key_prefix,
        mask_kind,
        window,
    )
    return mask[:, None]


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int = 0,
    implementation: str = "xla",
    block_size: int = DEFAULT_BLOCK_SIZE,
    mask_kind: str = "causal",
    query_prefix: jax.Array | None = None,
    key_prefix: jax.Array | None = None,
    scale: float | None = None,
    logit_cap: float = 0.0,
    window: jax.Array | int | None = None,
) -> jax.Array:
    """[batch, q_len, heads, head_dim] attention output, in `query`'s dtype.

    `block_size`: queries and keys per tile of blockwise and splash attention.
    `mask_kind`: causal, bidirectional or prefix (the rule above); `query_prefix`
    [batch, q_len] and `key_prefix` [batch, k_len]: the prefix kind's masks (both or neither).
    `scale`, `logit_cap` and `window` (None, or per layer a possibly traced int, <= 0 =
    global): the rule above.
    """
    if query_prefix is None and mask_kind == "prefix":
        mask_kind = "causal"  # no prefix: blockwise may then skip the future's tiles
    args = (query, key, value, query_segment_ids, key_segment_ids)
    prefixes = (query_prefix, key_prefix)
    scores = Scores(query.shape[-1] ** -0.5 if scale is None else scale, logit_cap)
    blockwise = lambda offset: blockwise_attention(
        *args, offset, block_size, mask_kind, *prefixes, scores, window
    )
    if implementation == "blockwise":
        return blockwise(query_offset)
    training_shape = query.shape[1] == key.shape[1] and _is_zero(query_offset)
    if implementation == "cudnn" and training_shape:
        if logit_cap:
            raise UserError(
                "model.attn_logit_softcap: cuDNN's fused attention has no soft-capping; use "
                "model.attention_implementation=blockwise (or xla)."
            )
        return _cudnn(*args, mask_kind, *prefixes, scores.scale, window)
    if implementation == "splash" and training_shape:
        _require_backend("splash", "tpu", "a TPU")
        if mask_kind != "prefix" and window is None and not logit_cap:
            return splash_attention(*args, block_size, mask_kind, scale=scores.scale)
        logging.log_first_n(
            logging.WARNING,
            "splash attention has no per-row prefix mask, per-layer sliding window or "
            "soft-capping here; these layers run model.attention_implementation=blockwise.",
            1,
        )
        return blockwise(0)
    mask = attention_mask(
        query_segment_ids,
        key_segment_ids,
        query.shape[1],
        key.shape[1],
        query_offset,
        mask_kind,
        *prefixes,
        window,
    )
    return grouped_attention(query, key, value, mask, scores)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def _require_backend(implementation, backend, what):
    if jax.default_backend() != backend:
        raise UserError(
            f"model.attention_implementation={implementation} needs {what}, not "
            f"{jax.default_backend()}; use blockwise (any backend) or xla."
        )


def grouped_attention(query, key, value, mask, scores: Scores, key_layout: str = "bskd"):
    """Dense attention of query [b, t, heads, d] over keys and values laid out as
    `key_layout` ("bskd"; the KV cache's heads-major "bksd"), query heads grouped over the
    KV heads, scores by `scores`, `mask` [b or 1, 1, t, s]: the xla implementation.

    Without grouping (heads == kv_heads) the einsums have no group axis: XLA:CPU runs
    that 4-D form's forward and backward ~1.5x faster than a group axis of size 1, or
    than jax.nn.dot_product_attention (BENCHMARKS.md; benchmarks/attention.py
    --implementations=jax.nn,xla)."""
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[key_layout.index("k")]
    g = "g" if heads > kv_heads else ""
    query = query.reshape(batch, length, kv_heads, *([heads // kv_heads] if g else []), head_dim)
    raw = jnp.einsum(
        f"btk{g}d,{key_layout}->bk{g}ts", query, key, preferred_element_type=jnp.float32
    )
    logits = jnp.where(mask[:, :, None] if g else mask, scores(raw), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum(f"bk{g}ts,{key_layout}->btk{g}d", probs, value)
    return out.reshape(batch, length, heads, head_dim)


def _cudnn(
    query, key, value, query_segment_ids, key_segment_ids, mask_kind, q_prefix, k_prefix,
    scale, window,
):
    _require_backend("cudnn", "gpu", "an NVIDIA GPU")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"model.attention_implementation=cudnn needs model.dtype=bfloat16 or float16, "
            f"not {query.dtype}."
        )
    causal, mask = mask_kind == "causal", None
    segments = query_segment_ids is not None or key_segment_ids is not None
    if mask_kind == "prefix" or segments or window is not None:
        length = query.shape[1]
        rest = "bidirectional" if causal else mask_kind  # is_causal adds the order
        mask = attention_mask(
            query_segment_ids, key_segment_ids, length, length, 0, rest, q_prefix, k_prefix,
            window,
        )
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )
