"""The optimizer: global-norm clipping, then AdamW or Muon on a warmup + decay schedule.

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

`optimizer.name=muon` (Jordan 2024; Liu et al. 2025, "Muon is Scalable", Moonlight):
each matmul kernel's Nesterov momentum is orthogonalised by Newton-Schulz iterations
(optax.contrib.scale_by_muon) and scaled by 0.2 * sqrt(max(fan_in, fan_out)), Moonlight's
rule that gives it AdamW's update RMS, so one learning rate and one schedule drive both
parts; its decay is `muon_weight_decay`. Embeddings, the output head, norm scales and
biases keep AdamW (b1, b2, eps, weight_decay), as in Keller Jordan's and Moonlight's recipes:
the embedding is a lookup whose gradient touches only the rows seen, not a matmul whose
input spans the space, and both it and the head trained better with AdamW in their
ablations. Which axes form the matrix is read from the params'
logical axis names (`muon_axes`): a stacked kernel [layers, (experts,) *in, *out] is one
(in x out) matrix per layer (and expert), e.g. the attention query
[layers, embed, heads, head_dim] is embed x (heads * head_dim) per layer.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.transforms import MaskedNode

from errors import UserError

NO_DECAY_LEAVES = ("scale", "bias", "output_bias")
EMBEDDINGS = ("token_embed", "pos_embed")
ADAMW_UNDER_MUON = EMBEDDINGS + ("lm_head",)
STACK_AXES = ("layers", "experts")  # leading axes of stacked kernels: one matrix each
HEAD_AXES = ("heads", "kv_heads", "head_dim")  # one side of an attention kernel's matrix
MUON_RMS = 0.2  # Moonlight: AdamW's typical update RMS


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


def muon_axes(names) -> MuonDimensionNumbers | None:
    """The matrix Muon orthogonalises in a weight with these logical axis names, or None
    (fewer than two axes besides the stack's): (input axes, output axes), the leading
    `layers` / `experts` axes being a batch of matrices.

    Past the stack, two axes are (in, out); more are an attention kernel (or its LoRA or
    low-rank factor), whose head axes (heads | kv_heads, head_dim) are one side:
    [embed | heads, head_dim], [heads, head_dim | embed], [lora_rank | kv_heads, head_dim].
    """
    names = tuple(names)
    stack = 0
    while stack < len(names) and names[stack] in STACK_AXES:
        stack += 1
    rest = names[stack:]
    if len(rest) < 2:
        return None
    in_head = [n in HEAD_AXES for n in rest]
    sides = [i for i in range(1, len(rest)) if in_head[i] != in_head[i - 1]]
    if len(rest) > 2 and len(sides) != 1:
        raise UserError(
            f"optimizer.name=muon: no rule splits a weight with axes {names} into input and "
            "output axes (training/optimizer.py muon_axes); use optimizer.name=adamw"
        )
    num_in = 1 if len(rest) == 2 else sides[0]
    axes = tuple(range(stack, len(names)))
    return MuonDimensionNumbers(axes[:num_in], axes[num_in:])


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", None) for k in path)


def _map_by_path(fn, tree):
    """`fn(path keys, leaf)` over boxed or plain params, or updates masked by optax.partition."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if isinstance(x, MaskedNode) else fn(_path_keys(path), x),
        tree,
        is_leaf=lambda x: isinstance(x, (nn.Partitioned, MaskedNode)),
    )


def _weight_axes(keys: tuple, boxed: nn.Partitioned) -> MuonDimensionNumbers | None:
    """muon_axes of a matmul kernel; None for embeddings, the head, norms, biases, scales."""
    if keys[-1] in NO_DECAY_LEAVES or keys[0] in ADAMW_UNDER_MUON:
        return None
    if str(keys[-1]).endswith("_scale"):  # model.quantization's scales
        return None
    return muon_axes(boxed.names)


class MuonAxes:
    """Each weight's muon_axes (None: AdamW), by path.

    Gradients are plain arrays, so the logical names are read from the boxed params the
    optimizer state is made from (training/state.py makes every state, and its shardings,
    from boxed params, before the first update) and looked up by path at each update.
    """

    def __init__(self):
        self.by_path = None

    def labels(self, tree):
        """"muon" or "adamw" per weight, for optax.partition; reads the names from boxed
        params (the optimizer's init)."""
        leaves = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )[0]
        if leaves and all(isinstance(x, nn.Partitioned) for _, x in leaves):
            self.by_path = {_path_keys(p): _weight_axes(_path_keys(p), x) for p, x in leaves}
        elif self.by_path is None:
            raise ValueError("optimizer.name=muon: make the first state from boxed params")
        return _map_by_path(lambda keys, _: "adamw" if self.by_path[keys] is None else "muon", tree)

    def dimension_numbers(self, tree):
        return _map_by_path(lambda keys, _: self.by_path[keys], tree)


def scale_to_adamw_rms(axes: MuonAxes) -> optax.GradientTransformation:
    """Multiplies each orthogonalised update by 0.2 * sqrt(max(fan_in, fan_out)) (Moonlight),
    which matches AdamW's update RMS, so the two parts share one learning rate."""

    def scale(update, dims):
        fan_in = math.prod(update.shape[i] for i in dims.reduction_axis)
        fan_out = math.prod(update.shape[i] for i in dims.output_axis)
        return update * (MUON_RMS * math.sqrt(max(fan_in, fan_out)))

    def update(updates, state, params=None):
        del params
        dims = axes.dimension_numbers(updates)
        is_dims = lambda x: isinstance(x, MuonDimensionNumbers)
        return jax.tree.map(scale, updates, dims, is_leaf=is_dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon(opt_config, adamw: list) -> optax.GradientTransformationExtraArgs:
    """Muon on the matmul kernels, the `adamw` transforms on the other weights; the caller
    applies the learning rate to both."""
    axes = MuonAxes()
    orthogonalised = optax.chain(
        scale_by_muon(
            ns_steps=opt_config.muon_ns_steps,
            beta=opt_config.muon_beta,
            nesterov=opt_config.muon_nesterov,
            weight_dimension_numbers=axes.dimension_numbers,
        ),
        scale_to_adamw_rms(axes),
        optax.add_decayed_weights(opt_config.muon_weight_decay),
    )
    return optax.partition(
        {"muon": orthogonalised, "adamw": optax.chain(*adamw)}, axes.labels
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
    adamw = [
        optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
        optax.add_decayed_weights(
            opt_config.weight_decay,
            mask=lambda params: weight_decay_mask(params, opt_config.decay_embeddings),
        ),
    ]
    direction = [muon(opt_config, adamw)] if opt_config.name == "muon" else adamw
    transforms = [*direction, scale_by_step_schedule(schedule)]
    if opt_config.grad_clip_norm > 0:
        transforms.insert(0, optax.clip_by_global_norm(opt_config.grad_clip_norm))
    if opt_config.keep_sparsity:  # last: weight decay and the learning rate are in the update
        transforms.append(optax.masked(keep_zeros(), matrices_mask))
    return optax.chain(*transforms), schedule
