"""Self-attention: multi-head or grouped-query, packed segments, an optional KV cache.

Projections keep heads as their own axis ([embed, heads, head_dim] kernels) so
tensor parallelism can shard heads by name. The attention itself (scores,
mask, softmax, weighted values) is `model.attention_ops.attend`, in the
implementation and with the mask (causal, bidirectional, prefix) the config names.

While decoding, each layer's keys and values are written into its slice of the
KV cache at the cache index, and the queries attend to every cached key (see
model/decode.py); grouped-query models cache only their KV heads. An int8 cache
stores each new head vector as int8 with one float32 absmax scale, and the layer's
slice is dequantized to the compute dtype before attending. Decoding is causal: a
prefix LM's prompt is its prefix, bidirectional within the call that writes it (the
prefill), and a bidirectional model (masked LM) cannot decode.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from errors import UserError
from model.attention_ops import attend, attention_mask, grouped_attention
from model.blockwise_attention import Scores
from model.config import ModelConfig
from model.layers import Dense, apply_rope, make_norm, residual_init_std
from model.quantize import quantize

# One layer's cached keys or values. Heads before length: a decode step's scores are then
# one contiguous matrix-vector product per head (12x faster on CPU than length-major).
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")
CACHE_SCALE_AXES = CACHE_AXES[:-1]  # an int8 cache's scales: one per head vector


class Attention(nn.Module):
    config: ModelConfig
    lora_dropout: float = 0.0  # on LoRA adapters' input (model/layers.Dense); 0 outside training

    @nn.compact
    def __call__(
        self, x, positions, segment_ids, key_segment_ids, cache_index, cache, layer, prefix_mask
    ):
        """(output [batch, length, embed], the cache with this layer's new keys and values).

        Without a cache (None) the keys are the tokens' own (`key_segment_ids` =
        `segment_ids`, `cache_index` = 0). With one, `cache` holds every layer's keys
        and values ([layers, batch, kv_heads, cache_len, head_dim]; int8 ones with
        "key_scale"/"value_scale" [layers, batch, kv_heads, cache_len]); this layer writes
        its slice `layer` in place and attends over it, `key_segment_ids` covering it.
        `prefix_mask` [batch, length] (or None): the tokens of model.attention_mask=prefix's
        bidirectional prefix; the other masks ignore it.
        """
        cfg = self.config
        query, key, value = (
            project(cfg, x, name, self.lora_dropout) for name in ("query", "key", "value")
        )
        if cfg.qk_norm:
            query, key = _head_norm(cfg, "query_norm")(query), _head_norm(cfg, "key_norm")(key)
        local = _is_local(cfg, layer)
        window = None if local is None else jnp.where(local, cfg.sliding_window, 0)
        if cfg.position_embedding == "rope":
            theta = cfg.rope_theta
            if local is not None and cfg.local_rope_theta:
                theta = jnp.where(local, cfg.local_rope_theta, cfg.rope_theta)
            query = apply_rope(query, positions, theta)
            key = apply_rope(key, positions, theta)
        scores = Scores(cfg.attention_scale, cfg.attn_logit_softcap)
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
                mask_kind=cfg.attention_mask,
                query_prefix=prefix_mask,
                key_prefix=prefix_mask,
                scale=scores.scale,
                logit_cap=scores.cap,
                window=window,
            )
        else:  # written in place: a decode step moves one token's keys, not the cache
            if cfg.attention_mask == "bidirectional":
                raise UserError(
                    "model.attention_mask=bidirectional (a masked LM) sees later tokens, so it "
                    "cannot generate text with a KV cache; sample from a causal or prefix model."
                )
            cache = dict(cache)
            for name, new in (("key", key), ("value", value)):
                cache.update(_write_cache(cache, name, new, layer, cache_index))
            key, value = (_read_cache(cache, name, layer, cfg.dtype) for name in ("key", "value"))
            key_prefix = None
            if prefix_mask is not None:  # the prefix is the new tokens' (the prompt's)
                empty = jnp.zeros(key_segment_ids.shape, bool)
                key_prefix = lax.dynamic_update_slice(
                    empty, prefix_mask.astype(bool), (0, cache_index)
                )
            out = _attend_cache(
                query,
                key,
                value,
                segment_ids,
                key_segment_ids,
                cache_index,
                cfg.attention_mask,
                scores,
                window,
                prefix_mask,
                key_prefix,
            )
        return project_out(cfg, out, self.lora_dropout), cache


class CrossAttention(nn.Module):
    """A decoder token's attention over the encoder's output (an encoder-decoder's decoder
    blocks): every encoder token of its own segment, no positions (no RoPE), no window;
    scores scaled and soft-capped as self-attention's.

    With a KV cache the encoder's keys and values are computed once, by the call that passes
    the encoder's output (the prefill), and written whole to the cache's "cross_key" and
    "cross_value" [layers, batch, encoder length, kv_heads, head_dim]; later calls (encoded
    None) read them.
    """

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, encoded, segment_ids, encoder_segment_ids, cache, layer):
        cfg = self.config
        query = project(cfg, x, "query", self.lora_dropout)
        if encoded is not None:
            key, value = (project(cfg, encoded, n, self.lora_dropout) for n in ("key", "value"))
            if cache is not None:
                cache = dict(cache)
                for name, new in (("cross_key", key), ("cross_value", value)):
                    new = new.astype(cache[name].dtype)
                    cache[name] = lax.dynamic_update_index_in_dim(cache[name], new, layer, 0)
        else:  # decoding after the prefill: the cached ones
            key, value = (
                lax.dynamic_index_in_dim(cache[n], layer, 0, False).astype(cfg.dtype)
                for n in ("cross_key", "cross_value")
            )
        if segment_ids is not None:  # padding sees its row's first encoder token's segment,
            # so no query row is fully masked (an unpadded encoder row has no segment 0)
            segment_ids = jnp.where(segment_ids == 0, encoder_segment_ids[:, :1], segment_ids)
        out = attend(
            query,
            key,
            value,
            segment_ids,
            encoder_segment_ids,
            implementation=cfg.attention_implementation,
            block_size=cfg.attention_block_size,
            mask_kind="bidirectional",
            scale=cfg.attention_scale,
            logit_cap=cfg.attn_logit_softcap,
        )
        return project_out(cfg, out, self.lora_dropout), cache


def project(config: ModelConfig, x, name: str, lora_dropout: float):
    """The query, key or value projection `name` of x [b, t, embed] -> [b, t, heads, d]."""
    heads, head_names = (
        (config.num_heads, "heads") if name == "query" else (config.num_kv_heads, "kv_heads")
    )
    return Dense(
        config,
        "bte,ehd->bthd",
        (config.embed_dim, heads, config.head_dim),
        ("embed", head_names, "head_dim"),
        bias_rank=2,
        lora_dropout=lora_dropout,
        name=name,
    )(x)


def project_out(config: ModelConfig, out, lora_dropout: float):
    """The heads' outputs [b, t, heads, d] back to the residual stream [b, t, embed]."""
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    return Dense(
        config,
        "bthd,hde->bte",
        (config.num_heads, config.head_dim, config.embed_dim),
        ("heads", "head_dim", "embed"),
        init_std=residual_init_std(config),
        lora_dropout=lora_dropout,
        name="out",
    )(out)


def _is_local(config: ModelConfig, layer):
    """Whether layer `layer` (a traced index) is local, by model.attention_pattern repeated
    over the layers; None when the model has no local layers."""
    if not config.sliding_window:
        return None
    pattern = jnp.array([c == "L" for c in config.attention_pattern])
    return pattern[layer % len(config.attention_pattern)]


def _head_norm(config: ModelConfig, name: str) -> nn.Module:
    """RMSNorm over each head's vector (one head_dim scale shared by the heads), as Qwen3
    and Gemma 3 normalise queries and keys before RoPE."""
    return make_norm(dataclasses.replace(config, norm="rmsnorm"), name, "head_dim")


def quantize_cache(x):
    """(int8 x, float32 scale x.shape[:-1]): one absmax scale per head vector (last axis)."""
    q, scale = quantize(jnp.moveaxis(x, -1, 0), "int8", num_in=1)
    return jnp.moveaxis(q, 0, -1), scale


def dequantize_cache(q, scale, dtype):
    """The vectors of (q, scale) from quantize_cache, in `dtype`."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _write_cache(cache, name, new, layer, index):
    """The entries of `cache` that hold `new` [b, t, kv_heads, d] at (layer, index): `name`,
    and `name`_scale when the cache is int8 (then `new` is quantized first)."""
    entries = {name: new.swapaxes(1, 2)}
    if name + "_scale" in cache:
        entries = dict(zip((name, name + "_scale"), quantize_cache(entries[name])))
    return {
        k: lax.dynamic_update_slice(
            cache[k], v[None].astype(cache[k].dtype), (layer, 0, 0, index, 0)[: cache[k].ndim]
        )
        for k, v in entries.items()
    }


def _read_cache(cache, name, layer, dtype):
    """Layer `layer`'s keys or values [b, kv_heads, s, d] in `dtype` (dequantized if int8)."""
    read = lambda k: lax.dynamic_index_in_dim(cache[k], layer, 0, False)
    x = read(name)
    if name + "_scale" in cache:
        x = dequantize_cache(x, read(name + "_scale"), dtype)
    return nn.with_logical_constraint(x, CACHE_AXES)


def _attend_cache(
    query, key, value, segment_ids, key_segment_ids, cache_index, mask_kind, scores, window,
    *prefixes,
):
    """Attention of new tokens [b, t, heads, d] over the cache [b, kv_heads, s, d].

    The same rule as attention_ops.attend (from `cache_index`, same segment, `scores` and
    `window` as there, `prefixes` the query and key prefix masks), over the cache's
    heads-major layout.
    """
    mask = attention_mask(
        segment_ids, key_segment_ids, query.shape[1], key.shape[2], cache_index, mask_kind,
        *prefixes, window,
    )
    return grouped_attention(query, key, value, mask, scores, key_layout="bksd")
