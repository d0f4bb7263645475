"""Causal self-attention: multi-head or grouped-query, with segment masking.

Projections keep heads as their own axis ([embed, heads, head_dim] kernels)
so tensor parallelism can shard heads by name. The attention itself is
`jax.nn.dot_product_attention` (logits and softmax in float32), which accepts
fewer key/value heads than query heads (GQA) and a cuDNN fused kernel on GPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Dense, apply_rope, residual_init_std


def attention_mask(segment_ids: jax.Array | None, length: int) -> jax.Array:
    """Boolean [batch or 1, 1, q, k] mask: causal, and within the same segment.

    Padding (segment 0) attends to other padding only, so no row is ever fully
    masked and no NaN can appear.
    """
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]
    if segment_ids is None:
        return causal
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same_segment


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        e, d = cfg.embed_dim, cfg.head_dim

        def project(name, heads, head_names):
            return Dense(
                cfg,
                "bte,ehd->bthd",
                (e, heads, d),
                ("embed", head_names, "head_dim"),
                bias_rank=2,
                name=name,
            )(x)

        query = project("query", cfg.num_heads, "heads")
        key = project("key", cfg.num_kv_heads, "kv_heads")
        value = project("value", cfg.num_kv_heads, "kv_heads")
        if cfg.position_embedding == "rope":
            query = apply_rope(query, positions, cfg.rope_theta)
            key = apply_rope(key, positions, cfg.rope_theta)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))

        out = jax.nn.dot_product_attention(
            query, key, value, mask=mask, implementation=cfg.attention_implementation
        )
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return Dense(
            cfg,
            "bthd,hde->bte",
            (cfg.num_heads, d, e),
            ("heads", "head_dim", "embed"),
            init_std=residual_init_std(cfg),
            name="out",
        )(out)
