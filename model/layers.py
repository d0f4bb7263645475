"""Building blocks of the transformer: norms, position encodings, the MLP.

Every parameter is created with logical axis names (see sharding/rules.py), as
many names as the parameter has dimensions.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.lora import adapter_output


def param_init(config: ModelConfig, names, std=None):
    """A normal initializer that carries logical axis names for sharding."""
    return nn.with_logical_partitioning(nn.initializers.normal(std or config.init_std), names)


def zeros_init(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    """Pre-norm layer: LayerNorm (GPT-2) or RMSNorm (Llama); statistics in float32."""
    common = dict(
        epsilon=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
        scale_init=ones_init(("embed",)),
    )
    if config.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(use_bias=config.use_bias, bias_init=zeros_init(("embed",)), **common)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """Fixed sin/cos position encodings ("Attention is all you need"), [..., dim]."""
    half = dim // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    encoding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(encoding, [(0, 0)] * positions.ndim + [(0, dim - 2 * half)])


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on [batch, length, heads, head_dim], in float32.

    Uses the "rotate half" layout (first half of head_dim paired with the second
    half), which is the layout of Hugging Face Llama checkpoints.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [b, t, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Dense(nn.Module):
    """`einsum(equation, x, kernel) (+ bias)` with a full-rank, logically named kernel.

    Multi-axis kernels such as [embed, heads, head_dim] keep each axis (and its
    sharding name) instead of being flattened to 2-D. The bias spans the last
    `bias_rank` kernel axes, which are the output axes. When the "lora" collection
    holds adapters "a" and "b" for this module, their low-rank path is added beside
    the kernel (model/lora.py), its input dropped out at rate `lora_dropout`.
    """

    config: ModelConfig
    equation: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    bias_rank: int = 1
    init_std: float | None = None
    lora_dropout: float = 0.0  # 0 outside training

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = self.param(
            "kernel", param_init(cfg, self.names, self.init_std), self.shape, cfg.param_dtype
        )
        y = jnp.einsum(self.equation, x.astype(cfg.dtype), kernel.astype(cfg.dtype))
        if self.has_variable("lora", "a"):
            a, b = (self.get_variable("lora", n).astype(cfg.dtype) for n in ("a", "b"))
            dropped = nn.Dropout(self.lora_dropout, deterministic=self.lora_dropout == 0.0)(x)
            y = y + adapter_output(self.equation, dropped.astype(cfg.dtype), a, b)
        if cfg.use_bias:
            out_names = self.names[-self.bias_rank :]
            bias = self.param(
                "bias", zeros_init(out_names), self.shape[-self.bias_rank :], cfg.param_dtype
            )
            y = y + bias.astype(cfg.dtype)
        return y


def residual_init_std(config: ModelConfig) -> float:
    """GPT-2's scaled init of residual-branch outputs keeps the stream's variance flat."""
    return config.init_std / (2 * config.num_layers) ** 0.5


class Mlp(nn.Module):
    """Position-wise feed-forward: GELU (two matrices) or SwiGLU (three)."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        up_shape, up_names = (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp")
        dense = functools.partial(Dense, cfg, lora_dropout=self.lora_dropout)
        up = lambda name: dense("bte,em->btm", up_shape, up_names, name=name)(x)
        if cfg.mlp_activation == "swiglu":
            hidden = nn.silu(up("wi_gate")) * up("wi_up")
        else:
            hidden = nn.gelu(up("wi"), approximate=True)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(
            "btm,me->bte",
            (cfg.mlp_dim, cfg.embed_dim),
            ("mlp", "embed"),
            init_std=residual_init_std(cfg),
            name="wo",
        )(hidden)
