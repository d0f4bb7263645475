"""Blockwise (flash-style) attention in plain JAX: memory linear in length, forward and backward.

The reference materialises [batch, heads, q_len, k_len] scores; here queries and
keys are processed in blocks with an online softmax, so at most one
[batch, heads, block, block] tile of scores exists at a time. A custom VJP saves
only the output and the per-query log-sum-exp and recomputes each tile in the
backward pass (FlashAttention-2's scheme). With the causal mask, key blocks
wholly in a query block's future are skipped, in both passes, which halves the
work; bidirectional and prefix masks visit every tile (a prefix token may see any
later prefix token), so they do the full work in the same linear memory. A local
layer's sliding window (traced: per layer, through the layer scan) also skips the
tiles wholly outside it, in both passes, so its work is linear in the window, and
soft-capped scores (`Scores`, Gemma 2) apply within each tile. Runs on
any backend (it is what --dry_run measures on CPU).

Lengths need not be multiples of the block: inputs are padded, the padding with
segment id PAD_SEGMENT, which no real token has, so no real query sees it under any
mask. Decoding shapes (a few queries at a traced `query_offset` over the KV cache)
work as they are, and (causal) skip the cache blocks not written yet.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from model.layers import soft_cap

PAD_SEGMENT = -1


def visible(q_index, k_index, q_seg, k_seg, q_prefix, k_prefix, kind, window=None):
    """Boolean [batch or 1, q, k]: the keys each query sees, attention_ops' rule for `kind`.

    q_index [q] and k_index [k] are places in the key sequence; q_seg, q_prefix [b or 1, q]
    and k_seg, k_prefix [b or 1, k] (bool prefixes, None outside the prefix mask).
    `window` (None, or an int32 scalar that may be traced; <= 0 = no window): a local
    layer's, keys at distance >= window are hidden too.
    """
    mask = q_seg[:, :, None] == k_seg[:, None, :]
    if window is not None:
        near = jnp.abs(q_index[:, None] - k_index[None, :]) < window
        mask = mask & (near | (window <= 0))[None]
    if kind == "bidirectional":
        return mask
    order = (k_index[None, :] <= q_index[:, None])[None]
    if kind == "prefix":
        order = order | (q_prefix.astype(bool)[:, :, None] & k_prefix.astype(bool)[:, None, :])
    return mask & order


class Scores(NamedTuple):
    """How raw q.k products become scores: times `scale`, then `cap` x tanh(s / cap) when
    `cap` > 0 (Gemma 2's soft-capping). Static: part of the compiled kernel."""

    scale: float
    cap: float = 0.0

    def __call__(self, raw):
        s = raw * self.scale
        return soft_cap(s, self.cap)

    def grad_factor(self, s):
        """d(scores)/d(raw) from the scores themselves."""
        if not self.cap:
            return self.scale
        return self.scale * (1.0 - jnp.square(s / self.cap))


class _MaskInputs(NamedTuple):
    """What a tile's mask is made of, padded to whole blocks (prefixes None unless prefix)."""

    q_seg: jax.Array
    k_seg: jax.Array
    q_prefix: jax.Array | None
    k_prefix: jax.Array | None
    offset: jax.Array
    window: jax.Array | None  # a local layer's sliding window (<= 0: none), else None


def blockwise_attention(
    query,
    key,
    value,
    query_segment_ids,
    key_segment_ids,
    query_offset,
    block_size,
    kind="causal",
    query_prefix=None,
    key_prefix=None,
    scores=None,
    window=None,
):
    """attention_ops.attend's contract, `block_size` queries and keys per tile; `scores`: a
    `Scores` (default: scaled by head_dim ** -0.5)."""
    batch, q_len, heads, head_dim = query.shape
    k_len, kv_heads = key.shape[1], key.shape[2]
    block_q, block_k = min(block_size, q_len), min(block_size, k_len)
    q_pad, k_pad = -q_len % block_q, -k_len % block_k
    if query_segment_ids is None:
        query_segment_ids = jnp.ones((batch, q_len), jnp.int32)
    if key_segment_ids is None:
        key_segment_ids = jnp.ones((batch, k_len), jnp.int32)

    def pad(x, amount, axis, value=0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, amount)
        return jnp.pad(x, widths, constant_values=value)

    def pad_prefix(prefix, amount):
        return None if kind != "prefix" else pad(prefix.astype(bool), amount, 1)

    # Heads-major layouts; query heads grouped over their KV head (as jax.nn and the cache).
    q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    q = pad(q.transpose(0, 2, 3, 1, 4), q_pad, 3)
    k = pad(key.transpose(0, 2, 1, 3), k_pad, 2)
    v = pad(value.transpose(0, 2, 1, 3), k_pad, 2)
    mask = _MaskInputs(
        pad(query_segment_ids.astype(jnp.int32), q_pad, 1, PAD_SEGMENT),
        pad(key_segment_ids.astype(jnp.int32), k_pad, 1, PAD_SEGMENT),
        pad_prefix(query_prefix, q_pad),
        pad_prefix(key_prefix, k_pad),
        jnp.asarray(query_offset, jnp.int32),
        None if window is None else jnp.asarray(window, jnp.int32),
    )
    scores = scores or Scores(head_dim**-0.5)
    out = _flash(q, k, v, mask, (kind, scores), block_q, block_k)
    out = out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, head_dim)


def _tile(x, index, size, axis):
    return lax.dynamic_slice_in_dim(x, index * size, size, axis)


def _scores_and_mask(q_blk, k_blk, mask, rule, i, j, block_q, block_k):
    """f32 scores [b, kvh, g, bq, bk] of query block i against key block j, and the mask;
    `rule`: (mask kind, Scores)."""
    kind, scores = rule
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
    rows = lambda x: None if x is None else _tile(x, i, block_q, 1)
    cols = lambda x: None if x is None else _tile(x, j, block_k, 1)
    q_index = mask.offset + i * block_q + jnp.arange(block_q)
    k_index = j * block_k + jnp.arange(block_k)
    allowed = visible(
        q_index,
        k_index,
        rows(mask.q_seg),
        cols(mask.k_seg),
        rows(mask.q_prefix),
        cols(mask.k_prefix),
        kind,
        mask.window,
    )
    return scores(s), allowed[:, None, None]


def _key_blocks(kind, window, offset, i, block_q, block_k, num_k):
    """[start, end) of the key blocks query block i can see: causal, none in its future; a
    local layer's window, none wholly farther than it."""
    first = offset + i * block_q
    last = first + block_q - 1
    start, end = 0, num_k
    if kind == "causal":
        end = jnp.clip(last // block_k + 1, 0, num_k)
    if window is not None:
        near_start = jnp.clip((first - window + 1) // block_k, 0, num_k)
        near_end = jnp.clip((last + window - 1) // block_k + 1, 0, num_k)
        start = jnp.where(window > 0, near_start, start)
        end = jnp.where(window > 0, jnp.minimum(end, near_end), end)
    return start, end


def _query_blocks(kind, window, offset, j, block_q, block_k, num_q):
    """[start, end) of the query blocks that can see key block j (`_key_blocks` inverted)."""
    first = j * block_k - offset
    last = first + block_k - 1
    start, end = 0, num_q
    if kind == "causal":
        start = jnp.clip(first // block_q, 0, num_q)
    if window is not None:
        near_start = jnp.clip((first - window + 1) // block_q, 0, num_q)
        near_end = jnp.clip((last + window - 1) // block_q + 1, 0, num_q)
        start = jnp.where(window > 0, jnp.maximum(start, near_start), start)
        end = jnp.where(window > 0, near_end, end)
    return start, end


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, rule, block_q, block_k):
    return _forward(q, k, v, mask, rule, block_q, block_k)[0]


def _forward(q, k, v, mask, rule, block_q, block_k):
    """(output [b, kvh, g, tq, d] in q's dtype, log-sum-exp [b, kvh, g, tq] in f32)."""
    num_q, num_k = q.shape[3] // block_q, k.shape[2] // block_k

    def query_block(i, outputs):
        out, lse = outputs
        q_blk = _tile(q, i, block_q, 3)

        def key_block(j, carry):
            acc, m, denom = carry
            s, allowed = _scores_and_mask(
                q_blk, _tile(k, j, block_k, 2), mask, rule, i, j, block_q, block_k
            )
            s = jnp.where(allowed, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing seen yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum(
                "bkgqs,bksd->bkgqd",
                p.astype(v.dtype),
                _tile(v, j, block_k, 2),
                preferred_element_type=jnp.float32,
            )
            return acc * alpha[..., None] + pv, m_new, denom * alpha + p.sum(-1)

        stats_shape = q_blk.shape[:-1]
        init = (
            jnp.zeros(q_blk.shape, jnp.float32),
            jnp.full(stats_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
        )
        start, end = _key_blocks(rule[0], mask.window, mask.offset, i, block_q, block_k, num_k)
        acc, m, denom = lax.fori_loop(start, end, key_block, init)
        seen = denom > 0  # padded query rows may see no key at all
        o_blk = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse_blk = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)
        out = lax.dynamic_update_slice_in_dim(out, o_blk.astype(out.dtype), i * block_q, 3)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, i * block_q, 3)
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
    return lax.fori_loop(0, num_q, query_block, init)


def _flash_fwd(q, k, v, mask, rule, block_q, block_k):
    out, lse = _forward(q, k, v, mask, rule, block_q, block_k)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(rule, block_q, block_k, residuals, d_out):
    """Outer loop over key blocks, inner over the query blocks that see them (FA-2)."""
    q, k, v, mask, out, lse = residuals
    num_q, num_k = q.shape[3] // block_q, k.shape[2] // block_k
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    scores = rule[1]

    def key_block(j, grads):
        dq, dk, dv = grads
        k_blk, v_blk = _tile(k, j, block_k, 2), _tile(v, j, block_k, 2)

        def query_block(i, carry):
            dq, dk_blk, dv_blk = carry
            q_blk, do_blk = _tile(q, i, block_q, 3), _tile(d_out, i, block_q, 3)
            s, allowed = _scores_and_mask(q_blk, k_blk, mask, rule, i, j, block_q, block_k)
            p = jnp.where(allowed, jnp.exp(s - _tile(lse, i, block_q, 3)[..., None]), 0.0)
            dv_blk += jnp.einsum(
                "bkgqs,bkgqd->bksd",
                p.astype(do_blk.dtype),
                do_blk,
                preferred_element_type=jnp.float32,
            )
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - _tile(delta, i, block_q, 3)[..., None]) * scores.grad_factor(s)
            ds = ds.astype(q.dtype)
            dq_blk = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_blk, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, _tile(dq, i, block_q, 3) + dq_blk, i * block_q, 3
            )
            dk_blk += jnp.einsum("bkgqs,bkgqd->bksd", ds, q_blk, preferred_element_type=jnp.float32)
            return dq, dk_blk, dv_blk

        start, end = _query_blocks(rule[0], mask.window, mask.offset, j, block_q, block_k, num_q)
        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        dq, dk_blk, dv_blk = lax.fori_loop(start, end, query_block, (dq, zeros, zeros))
        dk = lax.dynamic_update_slice_in_dim(dk, dk_blk, j * block_k, 2)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_blk, j * block_k, 2)
        return dq, dk, dv

    zeros_q, zeros_k = jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32)
    dq, dk, dv = lax.fori_loop(0, num_k, key_block, (zeros_q, zeros_k, zeros_k))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
