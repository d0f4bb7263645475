"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule.

Weight decay applies to matmul kernels only: never to norm scales or biases,
and to the embeddings only when `optimizer.decay_embeddings` is set.
"""

import flax.linen as nn
import jax
import optax

from errors import UserError

NO_DECAY_LEAVES = ("scale", "bias")
EMBEDDINGS = ("token_embed", "pos_embed")


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine or linear decay to a floor."""
    peak = opt_config.learning_rate
    floor = peak * opt_config.final_lr_fraction
    warmup = opt_config.warmup_steps
    if not 0 <= warmup <= num_steps:
        raise UserError(
            f"optimizer.warmup_steps={warmup} must be between 0 and train.num_steps={num_steps}."
        )
    decay_steps = max(num_steps - warmup, 1)
    if opt_config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_config.final_lr_fraction)
    elif opt_config.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif opt_config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise UserError(
            f"optimizer.schedule={opt_config.schedule!r}: must be cosine, linear or constant."
        )
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


def make_optimizer(
    opt_config, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_config, num_steps)
    adamw = optax.adamw(
        schedule,
        b1=opt_config.b1,
        b2=opt_config.b2,
        eps=opt_config.eps,
        weight_decay=opt_config.weight_decay,
        mask=lambda params: weight_decay_mask(params, opt_config.decay_embeddings),
    )
    transforms = [adamw]
    if opt_config.grad_clip_norm > 0:
        transforms.insert(0, optax.clip_by_global_norm(opt_config.grad_clip_norm))
    return optax.chain(*transforms), schedule
