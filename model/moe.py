"""Mixture-of-experts MLP: a float32 router picks `experts_per_token` of `num_experts`
SwiGLU experts per token (plus always-on shared experts), and the losses that keep it
balanced.

Routing: probabilities = softmax(router logits), the top k kept; "softmax_topk_renorm"
rescales the k weights to sum to 1 (Mixtral, Qwen3-MoE with norm_topk_prob),
"softmax_topk" keeps them as they are (Qwen3-MoE without).

Dispatch (model.moe_dispatch; model/moe_dispatch.py runs it per batch shard, exchanging
tokens between expert shards with an all-to-all):
  * dropless: each device's N*k assignments are sorted by expert and each expert's rows
    go through one grouped matmul (`jax.lax.ragged_dot`); nothing is dropped.
  * capacity: each expert has C = ceil(capacity_factor * N * k / E) slots (at most N)
    per batch shard, N that shard's tokens; an expert takes the shard's assignments in
    order of position in its flattened [batch * length] rows, token-major then by rank
    among the token's k choices, and drops those past its first C (their weight is 0;
    the residual carries the token). Which assignments drop depends on how the batch is
    split over devices (and microbatches); the dropped fraction is logged.

Statistics (collection "moe_stats", sown per MoE layer, float32 sums over the real
tokens, segment_ids != 0): `counts` [E] routed assignments (before dropping),
`prob_sums` [E] router probabilities, `z_sum` squared logsumexp of the logits,
`dropped` assignments and `tokens`. Sums, so they add up over microbatches and devices
to the global batch's; `aux_losses` forms the losses from the totals.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Mlp, param_init, residual_init_std
from model.moe_dispatch import dispatch

STATS = "moe_stats"
STAT_NAMES = ("counts", "prob_sums", "z_sum", "dropped", "tokens")
PER_EXPERT = ("counts", "prob_sums")


def route(logits: jax.Array, k: int, renormalize: bool):
    """float32 logits [N, E] -> (weights [N, k], experts [N, k], probabilities [N, E])."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts, probs


class _Kernel(nn.Module):
    """One float parameter named `kernel` (so its path reads like a Dense's)."""

    config: ModelConfig
    shape: tuple[int, ...]
    names: tuple[str, ...]
    std: float
    dtype: str

    @nn.compact
    def __call__(self):
        init = param_init(self.config, self.names, self.std)
        return self.param("kernel", init, self.shape, self.dtype)


class MoeMlp(nn.Module):
    """Routed SwiGLU experts (+ shared experts): [batch, length, embed] -> same.

    `token_mask` [batch, length] marks the tokens counted in the statistics (None: all).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        batch, length, embed = x.shape
        num_experts, k, width = cfg.num_experts, cfg.experts_per_token, cfg.moe_mlp_dim
        router = _Kernel(
            cfg, (embed, num_experts), ("embed", "experts"), cfg.init_std, "float32", name="router"
        )()
        flat = x.reshape(-1, embed)
        logits = jnp.dot(flat.astype(jnp.float32), router)
        weights, experts, probs = route(logits, k, cfg.router_norm == "softmax_topk_renorm")

        def kernel(name, shape, names, std=cfg.init_std):
            param = _Kernel(cfg, shape, names, std, cfg.param_dtype, name=name)()
            return param.astype(cfg.dtype)

        up_names = ("experts", "embed", "moe_mlp")
        gate = kernel("wi_gate", (num_experts, embed, width), up_names)
        up = kernel("wi_up", (num_experts, embed, width), up_names)
        down = kernel(
            "wo", (num_experts, width, embed), ("experts", "moe_mlp", "embed"),
            residual_init_std(cfg),
        )
        per_token = lambda a: a.reshape(batch, length, k)
        y, kept = dispatch(
            x.astype(cfg.dtype), per_token(experts), per_token(weights.astype(cfg.dtype)),
            gate, up, down, cfg.moe_dispatch, cfg.capacity_factor,
        )
        if cfg.num_shared_experts:
            shared = dataclasses.replace(cfg, mlp_dim=cfg.num_shared_experts * width)
            y = y + Mlp(shared, name="shared")(x)
        mask = jnp.ones((batch, length)) if token_mask is None else token_mask
        mask = mask.reshape(-1).astype(jnp.float32)
        self._sow_stats(logits, experts, probs, kept.reshape(-1, k), mask)
        return y

    def _sow_stats(self, logits, experts, probs, kept, mask):
        if not self.is_mutable_collection(STATS):
            return
        assigned = jax.nn.one_hot(experts, self.config.num_experts, dtype=jnp.float32)
        stats = dict(
            counts=jnp.einsum("nke,n->e", assigned, mask),
            prob_sums=jnp.einsum("ne,n->e", probs, mask),
            z_sum=jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * mask),
            dropped=jnp.sum((~kept).astype(jnp.float32) * mask[:, None]),
            tokens=jnp.sum(mask),
        )
        for name, value in stats.items():
            self.sow(STATS, name, value, init_fn=lambda: 0.0, reduce_fn=lambda _, v: v)


def routed_expert_kernels(params) -> list:
    """The routed experts' kernels (layers/.../moe/{wi_gate,wi_up,wo}/kernel, not shared/)."""
    keys = lambda path: [getattr(k, "key", None) for k in path]
    return [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if "moe" in keys(path) and "shared" not in keys(path)
        and keys(path)[-2:-1] in (["wi_gate"], ["wi_up"], ["wo"])
    ]


def collect(stats) -> dict:
    """The "moe_stats" collection -> {name: [moe_layers, ...]}, however the layers nest."""
    leaves = jax.tree_util.tree_leaves_with_path(stats)
    out = {}
    for name in STAT_NAMES:
        found = [v for path, v in leaves if getattr(path[-1], "key", None) == name]
        per_expert = name in PER_EXPERT
        out[name] = jnp.concatenate(
            [v.reshape(-1, v.shape[-1]) if per_expert else v.reshape(-1) for v in found]
        )
    return out


def zero_stats(config: ModelConfig) -> dict:
    """Zeros shaped like `collect`'s result, to accumulate microbatches' stats in."""
    layers = config.num_layers // config.moe_every
    shape = lambda name: (layers, config.num_experts) if name in PER_EXPERT else (layers,)
    return {name: jnp.zeros(shape(name), jnp.float32) for name in STAT_NAMES}


def _per_layer(totals, k: int):
    """(load share f [L, E], mean probability p [L, E], mean z [L]) from summed stats."""
    tokens = jnp.maximum(totals["tokens"], 1.0)
    share = totals["counts"] / (k * tokens[:, None])
    return share, totals["prob_sums"] / tokens[:, None], totals["z_sum"] / tokens


def aux_losses(totals, k: int, frozen_share=False):
    """(load balance, router z) losses, each the mean over MoE layers.

    Load balance (Switch): E * sum_i f_i * p_i, f_i the share of the assignments routed to
    expert i (not differentiable), p_i its mean router probability. `frozen_share` stops
    the gradient through f explicitly (it is a count, so the value is the same).
    """
    share, prob, z = _per_layer(totals, k)
    if frozen_share:
        share = jax.lax.stop_gradient(share)
    balance = share.shape[-1] * jnp.sum(share * prob, axis=-1)
    return jnp.mean(balance), jnp.mean(z)


def metrics(totals, k: int) -> dict:
    """The logged MoE metrics from the global batch's summed stats."""
    balance, z = aux_losses(totals, k)
    share, _, _ = _per_layer(totals, k)
    assignments = jnp.maximum(k * jnp.sum(totals["tokens"]), 1.0)
    return dict(
        moe_load_balance=balance,
        moe_router_z=z,
        moe_load_min=jnp.min(share),  # over every layer and expert; 1/E when balanced
        moe_load_max=jnp.max(share),
        moe_dropped=jnp.sum(totals["dropped"]) / assignments,
    )
