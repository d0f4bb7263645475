"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule.

The learning rate is a pure function of the train state's step, passed to
`tx.update(..., step=state.step)`, not a count kept inside the optimizer state:
so the rate applied is always the rate logged, also after a skipped update (see
`train.skip_nonfinite_updates`), and a resumed run continues the schedule exactly.

Weight decay applies to matmul kernels only: never to norm scales or biases,
and to the embeddings only when `optimizer.decay_embeddings` is set.

With `optimizer.keep_sparsity` (fine-tuning a pruned model, compression/prune.py),
the kernels' and embeddings' weights that are exactly zero when the optimizer state
is made get zero updates, after weight decay and the learning rate, so they stay
exactly zero. Gradient clipping still counts their gradients in the global norm.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

NO_DECAY_LEAVES = ("scale", "bias")
EMBEDDINGS = ("token_embed", "pos_embed")


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine, linear or no decay to a floor."""
    peak = opt_config.learning_rate
    warmup = opt_config.warmup_steps
    decay_steps = max(num_steps - warmup, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(
            peak, decay_steps, alpha=opt_config.final_lr_fraction
        ),
        "linear": lambda: optax.linear_schedule(
            peak, peak * opt_config.final_lr_fraction, decay_steps
        ),
        "constant": lambda: optax.constant_schedule(peak),
    }[opt_config.schedule]()
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _by_names(params, rule):
    """A tree of bools, `rule(names on the leaf's path)` per parameter (boxed or plain params)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: rule([getattr(k, "key", None) for k in path]),
        params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def weight_decay_mask(params, decay_embeddings: bool):
    """True for parameters that get weight decay."""
    return _by_names(
        params,
        lambda names: names[-1] not in NO_DECAY_LEAVES
        and (decay_embeddings or names[0] not in EMBEDDINGS),
    )


def matrices_mask(params):
    """True for kernels and embeddings, the weights pruning zeroes; False for norm scales and
    biases, which are legitimately one or zero."""
    return _by_names(params, lambda names: names[-1] not in NO_DECAY_LEAVES)


class KeepZerosState(NamedTuple):
    masks: Any  # bool, like the params: False where the weight was zero at init


def keep_zeros() -> optax.GradientTransformation:
    """Zeroes the updates of the weights that are exactly zero in the params it is initialised
    on, so that they stay zero. The masks are optimizer state (checkpointed with it, restored
    on resume); on boxed params they keep the params' logical axes, so they shard alike."""

    def init(params):
        return KeepZerosState(jax.tree.map(lambda p: p != 0, params))

    def update(updates, state, params=None):
        del params
        masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.masks)
        return masked, state

    return optax.GradientTransformation(init, update)


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by -schedule(step), with `step` given to `update` by the caller."""

    def update(updates, state, params=None, *, step, **extra_args):
        del params, extra_args
        rate = schedule(step)
        return jax.tree.map(lambda u: -rate * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(
    opt_config, num_steps: int, schedule: optax.Schedule | None = None
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """(tx, schedule): call `tx.update(grads, opt_state, params, step=step)`.

    `schedule` replaces learning_rate_schedule's, e.g. one whose rate and warmup
    are traced per trial (training/vectorized.py).
    """
    schedule = schedule or learning_rate_schedule(opt_config, num_steps)
    transforms = [
        optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
        optax.add_decayed_weights(
            opt_config.weight_decay,
            mask=lambda params: weight_decay_mask(params, opt_config.decay_embeddings),
        ),
        scale_by_step_schedule(schedule),
    ]
    if opt_config.grad_clip_norm > 0:
        transforms.insert(0, optax.clip_by_global_norm(opt_config.grad_clip_norm))
    if opt_config.keep_sparsity:  # last: weight decay and the learning rate are in the update
        transforms.append(optax.masked(keep_zeros(), matrices_mask))
    return optax.chain(*transforms), schedule
