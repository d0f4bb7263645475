"""Causal self-attention: multi-head or grouped-query, packed segments, an optional KV cache.

Projections keep heads as their own axis ([embed, heads, head_dim] kernels) so
tensor parallelism can shard heads by name. The attention itself (scores,
mask, softmax, weighted values) is `model.attention_ops.attend`, in the
implementation the config names.

While decoding, each layer's keys and values are written into its slice of the
KV cache at the cache index, and the queries attend to every cached key (see
model/decode.py); grouped-query models cache only their KV heads.
"""

import flax.linen as nn
from jax import lax

from model.attention_ops import attend
from model.config import ModelConfig
from model.layers import Dense, apply_rope, residual_init_std

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # one layer's cached keys or values


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, key_segment_ids, cache_index, cache):
        """(output [batch, length, embed], updated layer cache {"key", "value"} or None).

        Without a cache the keys are the tokens' own (`key_segment_ids` = `segment_ids`,
        `cache_index` = 0); with one, `key_segment_ids` covers the whole cache.
        """
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
        if cache is not None:
            start = (0, cache_index, 0, 0)
            key = lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start)
            value = lax.dynamic_update_slice(
                cache["value"], value.astype(cache["value"].dtype), start
            )
            cache = {"key": key, "value": value}
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, CACHE_AXES)
        value = nn.with_logical_constraint(value, CACHE_AXES)

        out = attend(
            query,
            key,
            value,
            segment_ids,
            key_segment_ids,
            cache_index,
            implementation=cfg.attention_implementation,
        )
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = Dense(
            cfg,
            "bthd,hde->bte",
            (cfg.num_heads, d, e),
            ("heads", "head_dim", "embed"),
            init_std=residual_init_std(cfg),
            name="out",
        )(out)
        return out, cache
