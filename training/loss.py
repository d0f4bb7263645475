"""Masked next-token cross-entropy in float32, with optional z-loss, and the KL divergence
between a teacher's and the student's predictions (distillation, training/distill.py).

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

from model.layers import dot


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
    chunks = functools.partial(_chunks, chunk=min(chunk_size, targets.shape[1]))
    return _chunked_sums(
        chunks(hidden), output, chunks(targets), chunks(weights.astype(jnp.float32)), z_loss_weight
    )


def _chunks(x, chunk: int):
    """[batch, length, ...] -> [chunks, batch, chunk, ...], the last chunk padded with zeros."""
    batch, length = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, -length % chunk)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, -1, chunk, *x.shape[2:]).swapaxes(0, 1)


def project(hidden, output):
    """hidden [batch, positions, embed] @ output [embed, vocab]: float32 logits, as the model
    computes them."""
    logits = dot("bce,ev->bcv", hidden, output, 1, jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sums(hidden, output, targets, weights, z_loss_weight):
    return _chunked_forward(hidden, output, targets, weights, z_loss_weight)[0]


def _chunked_forward(hidden, output, targets, weights, z_loss_weight):
    def chunk_sums(carry, xs):
        h, t, w = xs
        logits = project(h, output)
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
        logits = project(h, output)
        probs = jnp.exp(logits - lz[..., None])
        on_target = w * (g_total + g_ce)
        on_probs = on_target + g_total * z_loss_weight * w * 2.0 * lz
        vocab_ids = lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        d_logits = probs * on_probs[..., None] - jnp.where(
            vocab_ids == t[..., None], on_target[..., None], 0.0
        )
        return _backprop(d_logits, h, output, d_output)

    d_output = jnp.zeros(output.shape, jnp.float32)
    d_output, d_hidden = lax.scan(chunk_grads, d_output, (hidden, targets, weights, log_z))
    d_weights = g_total * (ce + z_loss_weight * jnp.square(log_z)) + g_ce * ce + g_weights
    return d_hidden, d_output.astype(output.dtype), None, d_weights


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)


def _backprop(d_logits, h, output, d_output):
    """(d_output + this chunk's output gradient in float32, the chunk's hidden gradient)."""
    d_h = jnp.einsum(
        "bcv,ev->bce", d_logits.astype(output.dtype), output, preferred_element_type=jnp.float32
    )
    d_output += jnp.einsum(
        "bce,bcv->ev", h, d_logits.astype(h.dtype), preferred_element_type=jnp.float32
    )
    return d_output, d_h.astype(h.dtype)


def chunked_kl_sum(
    student_hidden: jax.Array,
    student_output: jax.Array,
    teacher_hidden: jax.Array,
    teacher_output: jax.Array,
    weights: jax.Array,
    temperature: float,
    reverse: bool,
    chunk_size: int,
) -> jax.Array:
    """Sum over tokens of weight * KL(teacher_T || student_T), or KL(student_T || teacher_T)
    when `reverse`, where x_T = softmax(logits / temperature) (not scaled by T^2 here).

    Like chunked_cross_entropy_sums, from each model's final hidden states [batch, length,
    embed] and output projection [embed, vocab] (the two widths may differ, the vocabularies
    not), `chunk_size` positions at a time (0 = the whole length at once): the forward pass
    keeps three float32 scalars per token (both log Z and the KL), the backward pass
    recomputes each chunk's logits of both models, so the largest temporaries are a few
    [batch, chunk, vocab] float32. The teacher gets no gradient (zero cotangents).
    """
    length = weights.shape[1]
    chunks = functools.partial(_chunks, chunk=min(chunk_size, length) if chunk_size else length)
    return _kl_sum(
        chunks(student_hidden),
        student_output,
        chunks(teacher_hidden),
        teacher_output,
        chunks(weights.astype(jnp.float32)),
        temperature,
        reverse,
    )


def _log_softmax(hidden, output, temperature, log_z=None):
    """(log softmax(logits / T), log Z) of one chunk; log Z is computed unless given."""
    logits = project(hidden, output) / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1) if log_z is None else log_z
    return logits - log_z[..., None], log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl_sum(s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse):
    return _kl_forward(s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse)[0]


def _kl_forward(s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse):
    def chunk_kl(total, xs):
        sh, th, w = xs
        log_s, s_log_z = _log_softmax(sh, s_output, temperature)
        log_t, t_log_z = _log_softmax(th, t_output, temperature)
        if reverse:
            kl = jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)
        else:
            kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
        return total + jnp.sum(kl * w), (s_log_z, t_log_z, kl)

    zero = jnp.zeros((), jnp.float32)
    return lax.scan(chunk_kl, zero, (s_hidden, t_hidden, weights))


def _kl_fwd(s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse):
    total, per_token = _kl_forward(
        s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse
    )
    return total, (s_hidden, s_output, t_hidden, t_output, weights, per_token)


def _kl_bwd(temperature, reverse, residuals, g):
    """d/d(student logits) per token, times g·w: forward KL (p_s − p_t) / T; reverse KL
    p_s·(log p_s − log p_t − KL) / T (the derivative of Σ p_s·(log p_s − log p_t))."""
    s_hidden, s_output, t_hidden, t_output, weights, (s_log_z, t_log_z, kl) = residuals

    def chunk_grads(d_output, xs):
        sh, th, w, s_lz, t_lz, k = xs
        log_s, _ = _log_softmax(sh, s_output, temperature, s_lz)
        log_t, _ = _log_softmax(th, t_output, temperature, t_lz)
        p_s = jnp.exp(log_s)
        d_kl = p_s * (log_s - log_t - k[..., None]) if reverse else p_s - jnp.exp(log_t)
        return _backprop(d_kl * (g * w / temperature)[..., None], sh, s_output, d_output)

    d_output = jnp.zeros(s_output.shape, jnp.float32)
    xs = (s_hidden, t_hidden, weights, s_log_z, t_log_z, kl)
    d_output, d_hidden = lax.scan(chunk_grads, d_output, xs)
    no_grad = jax.tree.map(jnp.zeros_like, (t_hidden, t_output))
    return d_hidden, d_output.astype(s_output.dtype), *no_grad, g * kl


_kl_sum.defvjp(_kl_fwd, _kl_bwd)
