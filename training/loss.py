"""Masked next-token cross-entropy in float32, with optional z-loss.

Returns *sums* over tokens (not means), so microbatches can be accumulated and
divided once by the total weight: the accumulated update then equals the
update of one large batch exactly.
"""

import jax
import jax.numpy as jnp


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
