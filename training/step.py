"""The jitted, sharded train and eval steps.

One train step = forward in the compute dtype, masked cross-entropy in float32
(from whole logits, or a chunk of positions at a time with `model.loss_chunk_size`),
gradients (accumulated over microbatches with `lax.scan` when asked), one optax
update. The state is donated, so its buffers are reused for the new state. A
distillation step also runs the teacher and adds its KL (training/distill.py).
float16 runs scale each microbatch's loss and skip overflowing updates
(training/loss_scale.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data.batch import fields
from model import moe
from model.lora import is_lora_tree, scaled, trainable, with_trainable
from model.pipeline import split_microbatches
from sharding import activate, batch_sharding, replicated
from training.loss import (
    chunked_cross_entropy_sums,
    chunked_kl_sum,
    cross_entropy_sums,
    project,
)


def _apply(model, params, batch, rng, adapters, return_hidden):
    """The model on `batch` -> (output, an MoE model's summed router stats, else {}):
    `adapters` is a LoRA run's "lora" collection (model/lora.scaled); dropout only with `rng`."""
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    mutable = [moe.STATS] if model.config.num_experts else False
    # Only a prefix-attention model reads the prefix mask, only an encoder-decoder the
    # encoder's fields: any other compiles as it did.
    extra = {}
    if model.config.attention_mask == "prefix":
        extra["prefix_mask"] = batch["prefix_mask"]
    if model.config.encoder_layers:
        extra["encoder_tokens"] = batch["encoder_inputs"]
        extra["encoder_segment_ids"] = batch["encoder_segment_ids"]
        extra["encoder_positions"] = batch["encoder_positions"]
    out = model.apply(
        variables,
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        deterministic=rng is None,
        rngs={} if rng is None else {"dropout": rng},
        return_hidden=return_hidden,
        mutable=mutable,
        **extra,
    )
    return (out[0], moe.collect(out[1][moe.STATS])) if mutable else (out, {})


def _batch_shardings(model, mesh, rules) -> dict:
    """Every field of the model's batches (data/batch.py) split over the batch axis."""
    encoder = model.config.encoder_layers > 0
    return {key: batch_sharding(mesh, rules) for key in fields(encoder)}


def _ce_sums(hidden, output, batch, z_loss_weight, chunk_size):
    if chunk_size > 0:
        return chunked_cross_entropy_sums(
            hidden, output, batch["targets"], batch["weights"], z_loss_weight, chunk_size
        )
    logits = project(hidden, output)  # the model's own einsum: the same sums as its logits'
    return cross_entropy_sums(logits, batch["targets"], batch["weights"], z_loss_weight)


def forward_sums(model, params, batch, rng, z_loss_weight, adapters=None, moe_stats=False):
    """(total loss, cross-entropy, weight) sums of one batch: the model, then the loss;
    `moe_stats` appends the router stats (model/moe.py; {} for a dense model)."""
    chunk_size = model.config.loss_chunk_size
    out, stats = _apply(model, params, batch, rng, adapters, return_hidden=chunk_size > 0)
    if chunk_size > 0:
        sums = _ce_sums(*out, batch, z_loss_weight, chunk_size)
    else:
        sums = cross_entropy_sums(out, batch["targets"], batch["weights"], z_loss_weight)
    return (*sums, stats) if moe_stats else sums


def distill_sums(
    model, params, batch, rng, z_loss_weight, adapters, distill, teacher_out, moe_stats=False
):
    """(total loss, cross-entropy, KL, weight) sums of one batch of a distillation run:
    total = alpha * T^2 * KL + (1 - alpha) * (CE + z-loss) by `distill` (a DistillConfig),
    the KL between the student's predictions and the teacher's, whose final hidden states
    and output projection are `teacher_out`; chunked by model.loss_chunk_size (0 = whole).
    alpha = 0 gives exactly forward_sums' total (the KL is then only measured)."""
    chunk_size = model.config.loss_chunk_size
    (hidden, output), stats = _apply(model, params, batch, rng, adapters, return_hidden=True)
    total, ce_sum, weight_sum = _ce_sums(hidden, output, batch, z_loss_weight, chunk_size)
    kl_sum = chunked_kl_sum(
        hidden,
        output,
        *teacher_out,
        batch["weights"],
        distill.temperature,
        distill.kl == "reverse",
        chunk_size,
    )
    if distill.alpha:  # alpha = 0: the loss without a teacher, exactly
        total = (1 - distill.alpha) * total + distill.alpha * distill.temperature**2 * kl_sum
    sums = (total, ce_sum, kl_sum, weight_sum)
    return (*sums, stats) if moe_stats else sums


def _with_moe_losses(total, weight_sum, stats, moe_weights, k):
    """`total` plus a term worth 0 whose gradient is that of the microbatch's MoE losses
    (weights `moe_weights` = (load balance, router z)) times its `weight_sum`, so that dividing
    by the global weight gives their weighted mean over microbatches. Exact with one
    microbatch; with several, each microbatch's load-balance gradient uses its own load
    shares f (the global f is known only after the last one). The values logged are exact,
    from the summed stats (model/moe.metrics)."""
    balance, z = moe.aux_losses(stats, k, frozen_share=True)
    aux = (moe_weights[0] * balance + moe_weights[1] * z) * weight_sum
    return total + aux - jax.lax.stop_gradient(aux)


def make_train_step(
    model,
    tx,
    schedule,
    mesh,
    rules,
    state_shardings,
    *,
    num_microbatches: int = 1,
    z_loss_weight: float = 0.0,
    skip_nonfinite_updates: bool = False,
    seed: int = 0,
    lora_config=None,
    teacher=None,
    loss_scale=None,
    moe_weights=(0.0, 0.0),
):
    """Returns `train_step(state, batch) -> (new_state, metrics)`, jitted over `mesh`.

    With LoRA params ({"base", "lora"}, model/lora.py) only the adapters get
    gradients and updates: the model adds them beside the base's kernels, and the
    base is a constant of the step. With a `teacher` (training/distill.Teacher) it is
    `train_step(state, batch, teacher_params)`: the teacher's params are a constant of
    the step too, outside the state, and the metrics add `distill_kl`. With a `loss_scale`
    (training/loss_scale.LossScale) the state carries its LossScaleState and the metrics add
    `loss_scale` and `skipped_steps`. An MoE model adds its losses weighted by `moe_weights`
    (load balance, router z) to the loss, and their metrics (model/moe.metrics).
    """
    sum_names = ("total", "cross_entropy", "weight") + (("distill_kl",) if teacher else ())
    experts = model.config.num_experts
    zero_stats = moe.zero_stats(model.config) if experts else {}

    def loss_and_grads(params, teacher_params, batch, rng, factor):
        """(gradients of the loss sum times `factor`, the unscaled sums)."""
        teacher_out = None if teacher is None else teacher.hidden(teacher_params, batch)

        def loss_fn(weights):
            if is_lora_tree(params):  # the adapters, beside the frozen base's kernels
                model_params, adapters = params["base"], scaled(weights, lora_config)
            else:
                model_params, adapters = weights, None
            args = (model, model_params, batch, rng, z_loss_weight, adapters)
            if teacher is None:
                total, ce_sum, weight_sum, stats = forward_sums(*args, moe_stats=True)
                sums = dict(total=total, cross_entropy=ce_sum, weight=weight_sum)
            else:
                *out, stats = distill_sums(*args, teacher.config, teacher_out, moe_stats=True)
                sums = dict(zip(("total", "cross_entropy", "distill_kl", "weight"), out))
            if experts:
                k = model.config.experts_per_token
                sums["total"] = _with_moe_losses(
                    sums["total"], sums["weight"], stats, moe_weights, k
                )
            return sums["total"], dict(sums, **stats)

        def scaled_loss_fn(weights):
            total, sums = loss_fn(weights)
            return (total if factor is None else total * factor), sums

        (_, sums), grads = jax.value_and_grad(scaled_loss_fn, has_aux=True)(trainable(params))
        return grads, sums

    def step(state, batch, teacher_params=None):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        # The loss scale applies to the microbatch's mean over its positions.
        positions = batch["targets"].size // num_microbatches
        factor = None if loss_scale is None else state.loss_scale.scale / positions
        if num_microbatches == 1:
            grads, sums = loss_and_grads(state.params, teacher_params, batch, rng, factor)
        else:

            def accumulate(carry, inputs):
                index, microbatch = inputs
                microbatch = jax.tree.map(
                    lambda x: nn.with_logical_constraint(x, ("batch", "length")), microbatch
                )
                rng_m = jax.random.fold_in(rng, index)
                out = loss_and_grads(state.params, teacher_params, microbatch, rng_m, factor)
                return jax.tree.map(jnp.add, carry, out), None

            zeros = (
                jax.tree.map(jnp.zeros_like, trainable(state.params)),
                dict(dict.fromkeys(sum_names, jnp.zeros((), jnp.float32)), **zero_stats),
            )
            microbatches = split_microbatches(batch, num_microbatches)
            (grads, sums), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(num_microbatches), microbatches)
            )

        denominator = jnp.maximum(sums["weight"], 1.0)
        unscale = denominator if factor is None else denominator * factor
        grads = jax.tree.map(lambda g: g / unscale, grads)
        loss, grad_norm = sums["total"] / denominator, optax.tree.norm(grads)
        if experts:  # exact, from the global batch's router stats
            moe_metrics = moe.metrics(sums, model.config.experts_per_token)
            loss += moe_weights[0] * moe_metrics["moe_load_balance"]
            loss += moe_weights[1] * moe_metrics["moe_router_z"]
        weights = trainable(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, weights, step=state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=with_trainable(state.params, optax.apply_updates(weights, updates)),
            opt_state=opt_state,
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # one global check
        if skip_nonfinite_updates or loss_scale is not None:
            new_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                new_state,
                state.replace(step=state.step + 1),
            )
        if loss_scale is not None:  # an overflow is the scale's to handle; the loss is ours
            scale_state = loss_scale.update(
                state.loss_scale, jnp.isfinite(loss), jnp.isfinite(grad_norm)
            )
            new_state, finite = new_state.replace(loss_scale=scale_state), jnp.isfinite(loss)
        metrics = {
            "loss": loss,
            "cross_entropy": sums["cross_entropy"] / denominator,
            "learning_rate": schedule(state.step),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state.params),
            "num_tokens": sums["weight"],
            "finite": finite,
        }
        if experts:
            metrics.update(moe_metrics)
        if teacher is not None:  # per token, before T^2 and alpha
            metrics["distill_kl"] = sums["distill_kl"] / denominator
        if loss_scale is not None:  # the scale of the next step; steps skipped so far
            metrics["loss_scale"] = new_state.loss_scale.scale
            metrics["skipped_steps"] = new_state.loss_scale.skipped_steps
        return new_state, metrics

    in_shardings = (state_shardings, _batch_shardings(model, mesh, rules))
    if teacher is not None:
        in_shardings += (jax.tree.map(lambda a: a.sharding, teacher.abstract_params),)
    jitted = jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def train_step(state, batch, *teacher_params):
        with activate(mesh, rules):
            return jitted(state, batch, *teacher_params)

    train_step.jitted = jitted  # for .lower() / memory analysis in benchmarks and --dry_run
    return train_step


def make_eval_step(model, mesh, rules, params_shardings):
    """Returns `eval_step(params, batch, target_bytes) -> {"ce_sum", "weight_sum", "bytes"}`
    (sums, to be accumulated; `target_bytes` is laid out like the batch's fields, e.g. each
    row's count in its first column); a bidirectional (masked-LM) model adds "correct_sum",
    its weighted argmax hits. One program per batch: the byte count needs no second one."""

    def step(params, batch, target_bytes):
        sums = {"bytes": jnp.sum(target_bytes)}
        if model.config.attention_mask != "bidirectional":
            _, ce_sum, weight_sum = forward_sums(model, params, batch, None, 0.0)
            return {**sums, "ce_sum": ce_sum, "weight_sum": weight_sum}
        logits, _ = _apply(model, params, batch, None, None, return_hidden=False)
        _, ce_sum, weight_sum = cross_entropy_sums(logits, batch["targets"], batch["weights"])
        hits = jnp.argmax(logits, axis=-1) == batch["targets"]
        correct_sum = jnp.sum(hits * batch["weights"].astype(jnp.float32))
        return {**sums, "ce_sum": ce_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}

    jitted = jax.jit(
        step,
        in_shardings=(
            params_shardings,
            _batch_shardings(model, mesh, rules),
            batch_sharding(mesh, rules),
        ),
        out_shardings=replicated(mesh),
    )

    def eval_step(params, batch, target_bytes):
        with activate(mesh, rules):
            return jitted(params, batch, target_bytes)

    return eval_step
