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
import jax
import jax.numpy as jnp
from jax import lax

from model.attention_ops import attend, attention_mask
from model.config import ModelConfig
from model.layers import Dense, apply_rope, residual_init_std

# One layer's cached keys or values. Heads before length: a decode step's scores are then
# one contiguous matrix-vector product per head (12x faster on CPU than length-major).
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class Attention(nn.Module):
    config: ModelConfig
    lora_dropout: float = 0.0  # on LoRA adapters' input (model/layers.Dense); 0 outside training

    @nn.compact
    def __call__(self, x, positions, segment_ids, key_segment_ids, cache_index, cache, layer):
        """(output [batch, length, embed], the cache with this layer's new keys and values).

        Without a cache (None) the keys are the tokens' own (`key_segment_ids` =
        `segment_ids`, `cache_index` = 0). With one, `cache` holds every layer's keys
        and values ([layers, batch, kv_heads, cache_len, head_dim]); this layer writes
        its slice `layer` in place and attends over it, `key_segment_ids` covering it.
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
                lora_dropout=self.lora_dropout,
                name=name,
            )(x)

        query = project("query", cfg.num_heads, "heads")
        key = project("key", cfg.num_kv_heads, "kv_heads")
        value = project("value", cfg.num_kv_heads, "kv_heads")
        if cfg.position_embedding == "rope":
            query = apply_rope(query, positions, cfg.rope_theta)
            key = apply_rope(key, positions, cfg.rope_theta)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        if cache is None:
            key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
            value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))
            out = attend(
                query,
                key,
                value,
                segment_ids,
                key_segment_ids,
                implementation=cfg.attention_implementation,
                block_size=cfg.attention_block_size,
            )
        else:  # written in place: a decode step moves one token's keys, not the cache
            start = (layer, 0, 0, cache_index, 0)
            cache = {
                name: lax.dynamic_update_slice(
                    cache[name], new.swapaxes(1, 2)[None].astype(cache[name].dtype), start
                )
                for name, new in (("key", key), ("value", value))
            }
            key, value = (
                nn.with_logical_constraint(
                    lax.dynamic_index_in_dim(cache[name], layer, 0, False), CACHE_AXES
                )
                for name in ("key", "value")
            )
            out = _attend_cache(query, key, value, segment_ids, key_segment_ids, cache_index)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = Dense(
            cfg,
            "bthd,hde->bte",
            (cfg.num_heads, d, e),
            ("heads", "head_dim", "embed"),
            init_std=residual_init_std(cfg),
            lora_dropout=self.lora_dropout,
            name="out",
        )(out)
        return out, cache


def _attend_cache(query, key, value, segment_ids, key_segment_ids, cache_index):
    """Attention of new tokens [b, t, heads, d] over the cache [b, kv_heads, s, d].

    The same rule as attention_ops.attend (causal from `cache_index`, same segment),
    written for the cache's heads-major layout; query heads are grouped over KV heads.
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(
        "btkgd,bksd->bkgts", query, key, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    mask = attention_mask(segment_ids, key_segment_ids, length, key.shape[2], cache_index)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, value)
    return out.reshape(batch, length, heads, head_dim)
