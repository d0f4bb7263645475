"""The decoder-only transformer.

    tokens -> token embedding (+ learned or sinusoidal positions)
           -> num_layers x Block (pre-norm attention, pre-norm MLP, residuals),
              stacked with nn.scan so compile time does not grow with depth
           -> final norm -> logits (float32), tied or untied output projection

Parameter paths (stable; the Hugging Face converters and later LoRA address them):

    token_embed                         [vocab, embed]
    pos_embed                           [max_seq_len, embed]      learned positions only
    layers/attn_norm/{scale,bias}       [layers, embed]           bias: LayerNorm + use_bias
    layers/attn/{query,key,value}/kernel  [layers, embed, heads|kv_heads, head_dim]
    layers/attn/{query,key,value}/bias    [layers, heads|kv_heads, head_dim]
    layers/attn/out/kernel              [layers, heads, head_dim, embed]   (+ bias [layers, embed])
    layers/mlp_norm/{scale,bias}        [layers, embed]
    layers/mlp/wi/kernel                [layers, embed, mlp]      gelu
    layers/mlp/{wi_gate,wi_up}/kernel   [layers, embed, mlp]      swiglu
    layers/mlp/wo/kernel                [layers, mlp, embed]      (+ biases when use_bias)
    final_norm/{scale,bias}             [embed]

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
    lm_head                             [embed, vocab]            untied embeddings only

Compressed runs (compress.py, docs/COMPRESSION.md) change the kernels' leaves: with
model.quantization each quantized `kernel` (`token_embed`, `lm_head`) is int8/int4
beside a float32 `kernel_scale` (model/quantize.py); with model.low_rank_ratio a
targeted `kernel` [*in, *out] is `kernel_a` [*in, rank] and `kernel_b` [rank, *out].

Decoding passes a KV cache (model/decode.py makes one):

    {"key", "value": [layers, batch, kv_heads, cache_len, head_dim],
     "segment_ids": [batch, cache_len], "index": int32 scalar}

(an int8 cache adds "key_scale", "value_scale": [layers, batch, kv_heads, cache_len]).

The new tokens are written at `index`; the call returns `(logits, cache)` with the
index advanced past them. The cache rides in the layer scan's carry, and each
layer writes its own slice in place.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from model import pipeline
from model.attention import Attention, CrossAttention
from model.config import ModelConfig
from errors import UserError
from model.layers import (
    Dense,
    Mlp,
    gelu,
    make_norm,
    param_init,
    sinusoidal_embedding,
    soft_cap,
    weight,
    zeros_init,
)
from model.moe import STATS, MoeMlp
from model.pipeline import Schedule

ACTIVATION = ("batch", "length", "embed")


class Block(nn.Module):
    """One pre-norm transformer layer; shaped as a scan body: (carry, xs) -> (carry, ys).

    The carry is (activations, KV cache or None): the whole cache rides in the carry so
    each layer updates its slice in place; xs is the layer's index into it.
    """

    config: ModelConfig
    deterministic: bool = True
    lora_dropout: float = 0.0
    moe: bool = False  # routed experts (model/moe.py) instead of the dense MLP

    @nn.compact
    def __call__(
        self, carry, layer, positions, segment_ids, key_segment_ids, cache_index, prefix_mask,
        encoder,
    ):
        """`encoder`: an encoder-decoder's decoder block's (encoder output or None after a
        prefill, encoder segment ids) for its cross-attention; None in any other block."""
        cfg = self.config
        x, cache = carry
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        lora_dropout = 0.0 if self.deterministic else self.lora_dropout
        h = make_norm(cfg, "attn_norm")(x)
        if not cfg.first_attn_norm:  # ModernBERT: layer 0's input is already normed
            h = jnp.where(layer == 0, x.astype(h.dtype), h)
        h, cache = Attention(cfg, lora_dropout, name="attn")(
            h, positions, segment_ids, key_segment_ids, cache_index, cache, layer, prefix_mask
        )
        x = x + dropout(self._post_norm("post_attn_norm", h))
        x = nn.with_logical_constraint(x, ACTIVATION)
        if encoder is not None:
            h = make_norm(cfg, "cross_norm")(x)
            encoded, encoder_segment_ids = encoder
            h, cache = CrossAttention(cfg, lora_dropout, name="cross_attn")(
                h, encoded, segment_ids, encoder_segment_ids, cache, layer
            )
            x = x + dropout(self._post_norm("post_cross_norm", h))
            x = nn.with_logical_constraint(x, ACTIVATION)
        h = make_norm(cfg, "mlp_norm")(x)
        if self.moe:
            mask = None if segment_ids is None else segment_ids != 0
            h = MoeMlp(cfg, name="moe")(h, mask)
        else:
            h = Mlp(cfg, lora_dropout, name="mlp")(h)
        x = x + dropout(self._post_norm("post_mlp_norm", h))
        x = nn.with_logical_constraint(x, ACTIVATION)
        return (x, cache), None

    def _post_norm(self, name, h):
        """model.post_norms: the sublayer's output normed before the residual add (Gemma)."""
        return make_norm(self.config, name)(h) if self.config.post_norms else h


class Group(nn.Module):
    """model.moe_every = n > 1: n-1 dense blocks then one MoE block, as one scan body."""

    config: ModelConfig
    deterministic: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, carry, group, *inputs):
        """`inputs`: Block's arguments after the layer index (positions, segment ids, ...)."""
        cfg, n = self.config, self.config.moe_every
        block = _remat(Block, cfg.remat_policy)
        for j in range(n):
            carry, _ = block(
                cfg, self.deterministic, self.lora_dropout, moe=j == n - 1, name=f"block_{j}"
            )(carry, group * n + j, *inputs)
        return carry, None


def _scan_body(cfg: ModelConfig):
    """(module, its keyword arguments, scan length): layers, or groups of moe_every layers."""
    if cfg.num_experts and cfg.moe_every > 1:
        return Group, {}, cfg.num_layers // cfg.moe_every
    return _remat(Block, cfg.remat_policy), dict(moe=cfg.num_experts > 0), cfg.num_layers


def _stack(cfg: ModelConfig, length: int, layer_axis: str):
    """The scanned layers (`_scan_body`'s body `length` times), an nn.Module class whose
    params have a leading layer axis named `layer_axis`."""
    body, _, _ = _scan_body(cfg)
    return nn.scan(
        body,
        variable_axes={
            "params": 0, "lora": 0, "calibration": 0, "calibration_gram": 0, STATS: 0,
            "intermediates": 0,
        },
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * 6,
        length=length,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: layer_axis},
    )


def _remat(block_cls, policy_name: str):
    if policy_name == "none":
        return block_cls
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    return nn.remat(block_cls, policy=policy, prevent_cse=False)  # scan already prevents CSE.


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
        layers = _stack(cfg, cfg.num_layers, "layers")(
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
        _, body_args, scan_length = _scan_body(cfg)
        # A pipelined model's layer axis is stored split over the stage mesh axis.
        layer_axis = "layers" if self.pipeline is None else "stage"
        layers = _stack(cfg, scan_length, layer_axis)(
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
        logits = jnp.einsum("bte,ev->btv", x, output, preferred_element_type=jnp.float32)
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
        _, body_args, _ = _scan_body(cfg)
        per_stage = cfg.num_layers // (schedule.stages * schedule.repeats)
        stack = _stack(cfg, per_stage, "layers")(
            cfg, deterministic, self.lora_dropout, parent=None, **body_args
        )
        layer_ids = jnp.arange(per_stage, dtype=jnp.int32)

        def stage_fn(weights, x, extras, rng):
            positions, segment_ids, prefix_mask = extras
            (x, _), _ = stack.apply(
                weights, (x, None), layer_ids, positions, segment_ids, segment_ids, 0,
                prefix_mask, None, rngs={} if rng is None else {"dropout": rng},
            )
            return x

        collections = ("params", "lora")
        weights = {c: self.variables[c]["layers"] for c in collections if c in self.variables}
        names = self._layer_names(stack, x, layer_ids, extras)
        weights = pipeline.stage_weights(weights, names, schedule)
        dropout = not deterministic and (cfg.dropout_rate > 0 or self.lora_dropout > 0)
        rng = self.make_rng("dropout") if dropout else None
        return pipeline.run(schedule, stage_fn, weights, x, extras, rng)

    def _layer_names(self, stack, x, layer_ids, extras):
        """Logical axis names of the layers' weights after their layer axis: the params' from
        an abstract init of one stage; LoRA adapters (small) replicated."""
        positions, segment_ids, prefix_mask = extras
        args = (x, None), layer_ids, positions, segment_ids, segment_ids, 0, prefix_mask, None
        boxed = jax.eval_shape(lambda: stack.init(jax.random.key(0), *args))
        names = {"params": jax.tree.map(
            lambda spec: tuple(spec)[1:], nn.get_partition_spec(boxed["params"]),
            is_leaf=lambda n: isinstance(n, jax.sharding.PartitionSpec),
        )}
        if "lora" in self.variables:
            adapters = self.variables["lora"]["layers"]
            names["lora"] = jax.tree.map(lambda a: (None,) * (a.ndim - 1), adapters)
        return names
