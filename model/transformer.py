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
    lm_head                             [embed, vocab]            untied embeddings only
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, attention_mask
from model.config import ModelConfig
from model.layers import Mlp, make_norm, param_init, sinusoidal_embedding

ACTIVATION = ("batch", "length", "embed")


class Block(nn.Module):
    """One pre-norm transformer layer; shaped as a scan body: (carry, xs) -> (carry, ys)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, positions):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = make_norm(cfg, "attn_norm")(x)
        x = x + dropout(Attention(cfg, name="attn")(h, mask, positions))
        x = nn.with_logical_constraint(x, ACTIVATION)
        h = make_norm(cfg, "mlp_norm")(x)
        x = x + dropout(Mlp(cfg, name="mlp")(h))
        x = nn.with_logical_constraint(x, ACTIVATION)
        return x, None


def _remat(block_cls, policy_name: str):
    if policy_name == "none":
        return block_cls
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    return nn.remat(block_cls, policy=policy, prevent_cse=False)  # scan already prevents CSE.


class Transformer(nn.Module):
    """`apply(params, tokens, segment_ids=None, positions=None) -> float32 logits`."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

        embedding = self.param(
            "token_embed",
            param_init(cfg, ("vocab", "embed")),
            (cfg.vocab_size, cfg.embed_dim),
            cfg.param_dtype,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
        if cfg.position_embedding == "learned":
            pos_table = self.param(
                "pos_embed",
                param_init(cfg, ("length", "embed")),
                (cfg.max_seq_len, cfg.embed_dim),
                cfg.param_dtype,
            )
            x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.dtype)
        elif cfg.position_embedding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.embed_dim).astype(cfg.dtype)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, ACTIVATION)

        layers = nn.scan(
            _remat(Block, cfg.remat_policy),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, name="layers")
        x, _ = layers(x, attention_mask(segment_ids, length), positions)

        x = make_norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            output = embedding.T
        else:
            output = self.param(
                "lm_head",
                param_init(cfg, ("embed", "vocab")),
                (cfg.embed_dim, cfg.vocab_size),
                cfg.param_dtype,
            )
        logits = jnp.einsum(
            "bte,ev->btv", x, output.astype(cfg.dtype), preferred_element_type=jnp.float32
        )
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
