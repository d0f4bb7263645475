"""Masked next-token cross-entropy in float32, with optional z-loss.

Returns *sums* over tokens (not means), so microbatches can be accumulated and
divided once by the total weight: the accumulated update then equals the
update of one large batch exactly.

Two ways to the same sums: `cross_entropy_sums` from whole [batch, length, vocab]
logits, and `chunked_cross_entropy_sums` from the final hidden states and the
output projection, computing the logits a few positions at a time in the forward
*and* the backward pass. With a 128k vocabulary the whole float32 logits (and
their gradient) are the largest arrays of a step; chunked, one chunk's are.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def cross_entropy_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss_weight: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (sum of weighted loss incl. z-loss, sum of weighted CE, sum of weights).

    `weights` is 0 for padding and for targets across a document boundary.
    z-loss (PaLM) penalises log Z^2 to keep the softmax normaliser near 1.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logits
    weights = weights.astype(jnp.float32)
    ce_sum = jnp.sum(ce * weights)
    total = ce_sum + z_loss_weight * jnp.sum(jnp.square(log_z) * weights)
    return total, ce_sum, jnp.sum(weights)


def chunked_cross_entropy_sums(
    hidden: jax.Array,
    output: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    z_loss_weight: float,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cross_entropy_sums(hidden @ output, ...) without ever holding all the logits.

    hidden [batch, length, embed], output [embed, vocab] (both in the compute dtype).
    The sequence is cut into chunks of `chunk_size` positions (the last one padded
    with zero weights); the forward pass keeps only each token's log Z, and the
    backward pass recomputes each chunk's logits, so the largest loss temporaries
    are [batch, chunk_size, vocab] float32. The output projection's gradient is
    accumulated over chunks in float32.
    """
    batch, length = targets.shape
    chunk = min(chunk_size, length)
    pad = -length % chunk

    def chunks(x):  # [batch, length, ...] -> [chunks, batch, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, -1, chunk, *x.shape[2:]).swapaxes(0, 1)

    return _chunked_sums(
        chunks(hidden), output, chunks(targets), chunks(weights.astype(jnp.float32)), z_loss_weight
    )


def _logits(hidden, output):
    logits = jnp.einsum("bce,ev->bcv", hidden, output, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sums(hidden, output, targets, weights, z_loss_weight):
    return _chunked_forward(hidden, output, targets, weights, z_loss_weight)[0]


def _chunked_forward(hidden, output, targets, weights, z_loss_weight):
    def chunk_sums(carry, xs):
        h, t, w = xs
        logits = _logits(h, output)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        ce = log_z - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        sums = (jnp.sum(ce * w) + z_loss_weight * jnp.sum(jnp.square(log_z) * w), jnp.sum(ce * w))
        return jax.tree.map(jnp.add, carry, sums), (log_z, ce)

    zero = jnp.zeros((), jnp.float32)
    (total, ce_sum), (log_z, ce) = lax.scan(chunk_sums, (zero, zero), (hidden, targets, weights))
    return (total, ce_sum, jnp.sum(weights)), (log_z, ce)


def _chunked_fwd(hidden, output, targets, weights, z_loss_weight):
    sums, (log_z, ce) = _chunked_forward(hidden, output, targets, weights, z_loss_weight)
    return sums, (hidden, output, targets, weights, log_z, ce)


def _chunked_bwd(z_loss_weight, residuals, cotangents):
    """d/dlogits = w·(g_total + g_ce)·(softmax − onehot) + g_total·z·w·2·logZ·softmax."""
    hidden, output, targets, weights, log_z, ce = residuals
    g_total, g_ce, g_weights = cotangents

    def chunk_grads(d_output, xs):
        h, t, w, lz = xs
        logits = _logits(h, output)
        probs = jnp.exp(logits - lz[..., None])
        on_target = w * (g_total + g_ce)
        on_probs = on_target + g_total * z_loss_weight * w * 2.0 * lz
        vocab_ids = lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        d_logits = probs * on_probs[..., None] - jnp.where(
            vocab_ids == t[..., None], on_target[..., None], 0.0
        )
        d_h = jnp.einsum(
            "bcv,ev->bce", d_logits.astype(output.dtype), output, preferred_element_type=jnp.float32
        )
        d_output += jnp.einsum(
            "bce,bcv->ev", h, d_logits.astype(h.dtype), preferred_element_type=jnp.float32
        )
        return d_output, d_h.astype(h.dtype)

    d_output = jnp.zeros(output.shape, jnp.float32)
    d_output, d_hidden = lax.scan(chunk_grads, d_output, (hidden, targets, weights, log_z))
    d_weights = g_total * (ce + z_loss_weight * jnp.square(log_z)) + g_ce * ce + g_weights
    return d_hidden, d_output.astype(output.dtype), None, d_weights


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)
