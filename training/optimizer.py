"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule.

The learning rate is a pure function of the train state's step, passed to
`tx.update(..., step=state.step)`, not a count kept inside the optimizer state:
so the rate applied is always the rate logged, also after a skipped update (see
`train.skip_nonfinite_updates`), and a resumed run continues the schedule exactly.

Weight decay applies to matmul kernels only: never to norm scales or biases,
and to the embeddings only when `optimizer.decay_embeddings` is set.
"""

import flax.linen as nn
import jax
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


def weight_decay_mask(params, decay_embeddings: bool):
    """True for parameters that get weight decay (works on boxed or plain params)."""

    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] in NO_DECAY_LEAVES:
            return False
        return decay_embeddings or names[0] not in EMBEDDINGS

    return jax.tree_util.tree_map_with_path(
        decays, params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


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
    return optax.chain(*transforms), schedule
