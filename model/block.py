"""One transformer layer (`Block`) and the scanned stack of them that the decoder, an
encoder-decoder's encoder and each pipeline stage run (model/transformer.py).

A Block is shaped as a scan body, (carry, layer index, broadcast inputs) -> (carry,
None): the carry is (activations, KV cache or None), so each layer updates its slice
of the cache in place. With model.moe_every = n > 1 a `Group` of n - 1 dense blocks and
one MoE block is the body.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, CrossAttention
from model.config import ModelConfig
from model.layers import Mlp, make_norm
from model.moe import STATS, MoeMlp

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


def scan_body(cfg: ModelConfig):
    """(module, its keyword arguments, scan length): layers, or groups of moe_every layers."""
    if cfg.num_experts and cfg.moe_every > 1:
        return Group, {}, cfg.num_layers // cfg.moe_every
    return _remat(Block, cfg.remat_policy), dict(moe=cfg.num_experts > 0), cfg.num_layers


def stack(cfg: ModelConfig, length: int, layer_axis: str):
    """The scanned layers (`scan_body`'s body `length` times), an nn.Module class whose
    params have a leading layer axis named `layer_axis`."""
    body, _, _ = scan_body(cfg)
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
