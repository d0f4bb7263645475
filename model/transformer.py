"""The transformer: decoder-only, or (model.encoder_layers > 0) an encoder-decoder.

    tokens -> token embedding (x sqrt(width) with embed_scale; + learned or sinusoidal
              positions; a norm with embed_norm)
           -> num_layers x Block (pre-norm attention, [pre-norm cross-attention over the
              encoder's output], pre-norm MLP; each sublayer's output normed again with
              post_norms; residuals), stacked with nn.scan so compile time does not grow
              with depth; local layers (attention_pattern) see a sliding window
           -> final norm [-> prediction head] -> logits (float32), tied or untied output
              projection [+ output bias] [soft-capped]

An encoder-decoder's encoder (`Encoder`) is the same embedding, scanned blocks (no
cross-attention, bidirectional) and final norm, with its own token embedding, over
the batch's encoder tokens; its output is each decoder block's cross-attention input.

Parameter paths (stable; the Hugging Face converters and later LoRA address them):

    token_embed                         [vocab, embed]
    pos_embed                           [max_seq_len, embed]      learned positions only
    embed_norm/{scale,bias}             [embed]                   embed_norm only
    layers/attn_norm/{scale,bias}       [layers, embed]           bias: LayerNorm + use_bias
    layers/attn/{query,key,value}/kernel  [layers, embed, heads|kv_heads, head_dim]
    layers/attn/{query,key,value}/bias    [layers, heads|kv_heads, head_dim]
    layers/attn/{query,key}_norm/scale  [layers, head_dim]        qk_norm only
    layers/attn/out/kernel              [layers, heads, head_dim, embed]   (+ bias [layers, embed])
    layers/post_attn_norm/scale         [layers, embed]           post_norms only
    layers/cross_norm, layers/post_cross_norm, layers/cross_attn/...   an encoder-decoder's
                                        decoder: as attn_norm, post_attn_norm and attn
    layers/mlp_norm/{scale,bias}        [layers, embed]
    layers/mlp/wi/kernel                [layers, embed, mlp]      gelu
    layers/mlp/{wi_gate,wi_up}/kernel   [layers, embed, mlp]      swiglu, geglu
    layers/mlp/wo/kernel                [layers, mlp, embed]      (+ biases when use_bias)
    layers/post_mlp_norm/scale          [layers, embed]           post_norms only
    final_norm/{scale,bias}             [embed]
    head/kernel, head_norm/scale        [embed, embed], [embed]   prediction_head only
    output_bias                         [vocab]                   prediction_head only
    lm_head                             [embed, vocab]            untied embeddings only
    encoder/...                         an encoder-decoder's encoder: token_embed,
                                        layers/... [encoder_layers, ...], final_norm

Mixture of experts (model.num_experts > 0, model/moe.py) replaces `layers/mlp` by:

    layers/moe/router/kernel            [layers, embed, experts]  float32
    layers/moe/{wi_gate,wi_up}/kernel   [layers, experts, embed, moe_mlp]
    layers/moe/wo/kernel                [layers, experts, moe_mlp, embed]
    layers/moe/shared/{wi_gate,wi_up}/kernel  [layers, embed, mlp]   num_shared_experts > 0,
    layers/moe/shared/wo/kernel         [layers, mlp, embed]      mlp = shared x moe_mlp_dim

With model.moe_every = n > 1 the scan runs over num_layers / n groups of n layers:
`layers/block_{j}/...` for j < n - 1 are dense layers (the paths above without the
`layers/` prefix, e.g. `layers/block_0/mlp/wo/kernel` [groups, mlp, embed]) and
`layers/block_{n-1}/moe/...` the group's MoE layer; layer index = group * n + j.

Compressed runs (compress.py, docs/COMPRESSION.md) change the kernels' leaves: with
model.quantization each quantized `kernel` (`token_embed`, `lm_head`) is int8/int4
beside a float32 `kernel_scale` (model/quantize.py); with model.low_rank_ratio a
targeted `kernel` [*in, *out] is `kernel_a` [*in, rank] and `kernel_b` [rank, *out].

Decoding passes a KV cache (model/decode.py makes one):

    {"key", "value": [layers, batch, kv_heads, cache_len, head_dim],
     "segment_ids": [batch, cache_len], "index": int32 scalar}

(an int8 cache adds "key_scale", "value_scale": [layers, batch, kv_heads, cache_len]).

(an encoder-decoder's adds "cross_key", "cross_value": [layers, batch, encoder_len,
kv_heads, head_dim] and "cross_segment_ids" [batch, encoder_len], written by the call
that passes the encoder's tokens, read by the later ones.)

The new tokens are written at `index`; the call returns `(logits, cache)` with the
index advanced past them. The cache rides in the layer scan's carry, and each
layer writes its own slice in place.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from model import pipeline
from errors import UserError
from model.config import ModelConfig
from model.block import ACTIVATION, scan_body, stack
from model.layers import (
    Dense,
    dot,
    gelu,
    make_norm,
    param_init,
    sinusoidal_embedding,
    soft_cap,
    weight,
    zeros_init,
)
from model.pipeline import Schedule

def _positions(tokens, positions):
    """Positions, 0, 1, ... along each row when not given."""
    if positions is not None:
        return positions
    batch, length = tokens.shape
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _embed(module, cfg: ModelConfig, tokens, positions, deterministic):
    """(the tokens' embeddings, position-encoded and normed as configured; the token
    embedding table [vocab, embed], which a tied output projection reuses)."""
    embedding = weight(
        module,
        "token_embed",
        (cfg.vocab_size, cfg.embed_dim),
        ("vocab", "embed"),
        1,
        param_init(cfg, ("vocab", "embed")),
        quantized=cfg.quantize_embeddings,
        transposed=True,
    )
    x = jnp.take(embedding, tokens, axis=0)
    if cfg.embed_scale:  # in the compute dtype, as Gemma
        x = x * jnp.asarray(cfg.embed_dim**0.5, x.dtype)
    if cfg.position_embedding == "learned":
        pos_table = module.param(
            "pos_embed",
            param_init(cfg, ("length", "embed")),
            (cfg.max_seq_len, cfg.embed_dim),
            cfg.param_dtype,
        )
        x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.dtype)
    elif cfg.position_embedding == "sinusoidal":
        x = x + sinusoidal_embedding(positions, cfg.embed_dim).astype(cfg.dtype)
    if cfg.embed_norm:
        x = make_norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
    return nn.with_logical_constraint(x, ACTIVATION), embedding


class Encoder(nn.Module):
    """An encoder-decoder's encoder: its own token embedding, the scanned blocks (no
    cross-attention) with bidirectional attention, a final norm. `config` is the model
    config's `encoder()` view."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, deterministic):
        cfg = self.config
        x, _ = _embed(self, cfg, tokens, positions, deterministic)
        layers = stack(cfg, cfg.num_layers, "layers")(
            cfg, deterministic, self.lora_dropout, name="layers"
        )
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, _), _ = layers(
            (x, None), layer_ids, positions, segment_ids, segment_ids, 0, None, None
        )
        return make_norm(cfg, "final_norm")(x)


class Transformer(nn.Module):
    """`apply(params, tokens, segment_ids=None, positions=None) -> float32 logits`.

    With `cache=`: `-> (logits, cache)`. With `return_hidden=True`: the final-norm
    hidden states and the output projection [embed, vocab] instead of logits, for a
    loss that computes the logits a chunk at a time (training/loss.py).

    A LoRA run also passes its adapters as the "lora" collection ({"params": ...,
    "lora": ...}, model/lora.py); `lora_dropout` drops their input when not
    `deterministic`.

    `prefix_mask` [batch, length] (1 = in its document's bidirectional prefix) is read by
    model.attention_mask=prefix only (model/attention_ops.py); with a cache, the prefix is
    the new tokens' (a prompt prefilled in one call).
    """

    config: ModelConfig
    lora_dropout: float = 0.0
    pipeline: Schedule | None = None  # mesh.stage > 1: the layers run as model/pipeline.py

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
        return_hidden: bool = False,
        prefix_mask: jax.Array | None = None,
        encoder_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
    ):
        cfg = self.config
        positions = _positions(tokens, positions)
        x, embedding = _embed(self, cfg, tokens, positions, deterministic)
        encoder = self._encode(
            tokens, cache, encoder_tokens, encoder_segment_ids, encoder_positions, deterministic
        )

        if cache is None:
            kv, key_segment_ids, cache_index = None, segment_ids, 0
        else:
            if segment_ids is None:
                segment_ids = jnp.ones_like(tokens)
            cache_index = cache["index"]
            key_segment_ids = lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index)
            )
            kv = {k: v for k, v in cache.items() if k not in ("segment_ids", "index")}
        _, body_args, scan_length = scan_body(cfg)
        # A pipelined model's layer axis is stored split over the stage mesh axis.
        layer_axis = "layers" if self.pipeline is None else "stage"
        layers = stack(cfg, scan_length, layer_axis)(
            cfg, deterministic, self.lora_dropout, name="layers", **body_args
        )
        if self.pipeline is None or cache is not None or self.is_initializing():
            layer_ids = jnp.arange(scan_length, dtype=jnp.int32)
            (x, kv), _ = layers(
                (x, kv), layer_ids, positions, segment_ids, key_segment_ids, cache_index,
                prefix_mask, encoder,
            )
        else:
            x = self._pipelined(x, (positions, segment_ids, prefix_mask), deterministic)

        x = make_norm(cfg, "final_norm")(x)
        if cfg.prediction_head:  # BERT's masked-LM transform
            dense = Dense(cfg, "bte,ef->btf", (cfg.embed_dim,) * 2, ("embed", "mlp"), name="head")
            x = make_norm(cfg, "head_norm")(gelu(cfg, dense(x)))
        if cfg.tie_embeddings:
            output = embedding.T
        else:
            output = weight(
                self,
                "lm_head",
                (cfg.embed_dim, cfg.vocab_size),
                ("embed", "vocab"),
                1,
                param_init(cfg, ("embed", "vocab")),
                quantized=cfg.quantize_embeddings,
            )
        if return_hidden:
            if cfg.prediction_head or cfg.final_logit_softcap:
                raise UserError(
                    "model.prediction_head and model.final_logit_softcap change the logits "
                    "after the output projection, which the chunked loss (model.loss_chunk_size "
                    "> 0) and distillation do not apply; set model.loss_chunk_size=0."
                )
            return x, output
        logits = dot("bte,ev->btv", x, output, 1, jnp.float32)
        if cfg.prediction_head:
            bias = self.param(
                "output_bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.param_dtype
            )
            logits = logits + bias.astype(jnp.float32)
        logits = soft_cap(logits, cfg.final_logit_softcap)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        cache = dict(kv, segment_ids=key_segment_ids, index=cache_index + tokens.shape[1])
        if encoder is not None:
            cache["cross_segment_ids"] = encoder[1]
        return logits, cache

    def _encode(self, tokens, cache, encoder_tokens, segment_ids, positions, deterministic):
        """An encoder-decoder's (encoder output, its segment ids) for the decoder's
        cross-attention; (None, the cached segment ids) when decoding after a prefill; None
        for a decoder-only model. At init the decoder's tokens stand in when none are given."""
        cfg = self.config
        if not cfg.encoder_layers:
            return None
        if encoder_tokens is None and self.is_initializing():
            encoder_tokens = tokens
        if encoder_tokens is None:
            if cache is None or "cross_segment_ids" not in cache:
                raise UserError(
                    f"model.encoder_layers={cfg.encoder_layers}: an encoder-decoder needs the "
                    "encoder's tokens (batch field encoder_inputs), or a cache they were "
                    "prefilled into."
                )
            return None, cache["cross_segment_ids"]
        if segment_ids is None:
            segment_ids = jnp.ones_like(encoder_tokens)
        encoded = Encoder(cfg.encoder(), self.lora_dropout, name="encoder")(
            encoder_tokens, segment_ids, _positions(encoder_tokens, positions), deterministic
        )
        return encoded, segment_ids.astype(jnp.int32)

    def _pipelined(self, x, extras, deterministic):
        """The layers as the stages of `self.pipeline` (model/pipeline.py), each stage the
        same scanned Block (remat, attention, LoRA) over its own block of layers; `extras`:
        the rows' (positions, segment ids, prefix mask), each going with its microbatch."""
        cfg, schedule = self.config, self.pipeline
        _, body_args, _ = scan_body(cfg)
        per_stage = cfg.num_layers // (schedule.stages * schedule.repeats)
        stage = stack(cfg, per_stage, "layers")(
            cfg, deterministic, self.lora_dropout, parent=None, **body_args
        )
        layer_ids = jnp.arange(per_stage, dtype=jnp.int32)

        def stage_fn(weights, x, extras, rng):
            positions, segment_ids, prefix_mask = extras
            (x, _), _ = stage.apply(
                weights, (x, None), layer_ids, positions, segment_ids, segment_ids, 0,
                prefix_mask, None, rngs={} if rng is None else {"dropout": rng},
            )
            return x

        collections = ("params", "lora")
        weights = {c: self.variables[c]["layers"] for c in collections if c in self.variables}
        names = self._layer_names(stage, x, layer_ids, extras)
        weights = pipeline.stage_weights(weights, names, schedule)
        dropout = not deterministic and (cfg.dropout_rate > 0 or self.lora_dropout > 0)
        rng = self.make_rng("dropout") if dropout else None
        return pipeline.run(schedule, stage_fn, weights, x, extras, rng)

    def _layer_names(self, stage, x, layer_ids, extras):
        """Logical axis names of the layers' weights after their layer axis: the params' from
        an abstract init of one stage; LoRA adapters (small) replicated."""
        positions, segment_ids, prefix_mask = extras
        args = (x, None), layer_ids, positions, segment_ids, segment_ids, 0, prefix_mask, None
        boxed = jax.eval_shape(lambda: stage.init(jax.random.key(0), *args))
        names = {"params": jax.tree.map(
            lambda spec: tuple(spec)[1:], nn.get_partition_spec(boxed["params"]),
            is_leaf=lambda n: isinstance(n, jax.sharding.PartitionSpec),
        )}
        if "lora" in self.variables:
            adapters = self.variables["lora"]["layers"]
            names["lora"] = jax.tree.map(lambda a: (None,) * (a.ndim - 1), adapters)
        return names
