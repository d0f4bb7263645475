"""Offline weight quantization of a run's params, and the way back to a plain float model.

`quantize_params` turns the float params of a model into the params that
`Transformer(model_config)` declares when model_config has model.quantization set:
every layers' kernel (`kernel_a` and `kernel_b` of a factorized model) becomes
int8/int4 beside its float32 `<name>_scale`, one layer at a time (model/quantize.py
on each layer's slice, vmapped over the layer axis, so each layer and output channel
gets its own scale); `token_embed` (as the tied head [embed, vocab], a scale per
vocab row) and an untied `lm_head` only with model.quantize_embeddings. Norms,
biases and pos_embed stay float.

`dense_params` goes back: every quantized weight dequantized and every factorized
kernel multiplied back (kernel_a @ kernel_b), giving the params of the plain model
(`plain_config`: quantization "none", no factors). Hugging Face export writes them,
and they are how a compressed run is compared with the dense one.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from compression.denses import map_denses
from model import quantize
from model.config import ModelConfig
from model.layers import target_name
from model.lora import TARGETS, low_rank_product

# The ModelConfig fields that make a model compressed; `plain_config` resets them.
COMPRESSION_FIELDS = (
    "quantization",
    "quant_group_size",
    "quantize_embeddings",
    "low_rank_ratio",
    "low_rank_targets",
)


def plain_config(model_config: ModelConfig) -> ModelConfig:
    """The same model with full float kernels: every compression field at its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return dataclasses.replace(model_config, **{k: defaults[k] for k in COMPRESSION_FIELDS})


def _kernels(dense: dict, name: str):
    """(leaf name, its number of input axes) of a Dense's kernel or factors; kernel_b's
    input is the rank axis."""
    num_in = TARGETS[target_name(name)][1]
    return [(k, 1 if k == "kernel_b" else num_in) for k in ("kernel", "kernel_a", "kernel_b")
            if k in dense]


# model/quantize.py compiled once per shape, not op by op; the _layers versions take a
# stacked kernel [layers, *in, *out] one layer at a time (a scale per layer and channel).
_quantize_layers = jax.jit(
    jax.vmap(quantize.quantize, in_axes=(0, None, None, None)), static_argnums=(1, 2, 3)
)
_quantize = jax.jit(quantize.quantize, static_argnums=(1, 2, 3))
_dequantize = jax.jit(quantize.dequantize, static_argnums=(2, 3))
_dequantize_layers = jax.jit(
    jax.vmap(quantize.dequantize, in_axes=(0, 0, None, None)), static_argnums=(2, 3)
)


def quantize_params(params, model_config: ModelConfig) -> dict:
    """The float `params` (plain or factorized) quantized as `model_config` declares them."""
    method, group = model_config.quantization, model_config.quant_group_size

    def change(module, name, leaves):
        new = dict(leaves)
        for kernel, num_in in _kernels(leaves, name):
            new[kernel], new[f"{kernel}_scale"] = _quantize_layers(
                leaves[kernel], method, num_in, group
            )
        return new

    quantized = map_denses(params, change)
    if model_config.quantize_embeddings:
        q, scale = _quantize(params["token_embed"].T, method, 1, group)
        quantized["token_embed"], quantized["token_embed_scale"] = q.T, scale
        if "lm_head" in params:
            quantized["lm_head"], quantized["lm_head_scale"] = _quantize(
                params["lm_head"], method, 1, group
            )
    return quantized


def dense_params(params, model_config: ModelConfig) -> tuple[dict, ModelConfig]:
    """(the plain model's params, its config): quantized weights dequantized (in
    model.param_dtype), factorized kernels multiplied back."""
    dtype = jnp.dtype(model_config.param_dtype)

    def dequantized(leaves, kernel, num_in):
        scale = leaves.get(f"{kernel}_scale")
        if scale is None:
            return leaves[kernel]
        return _dequantize_layers(leaves[kernel], scale, num_in, dtype)

    def change(module, name, leaves):
        new = {k: v for k, v in leaves.items() if not k.endswith("_scale")}
        new.update({k: dequantized(leaves, k, n) for k, n in _kernels(leaves, name)})
        if "kernel_a" in new:
            a, b = new.pop("kernel_a"), new.pop("kernel_b")
            new["kernel"] = low_rank_product(a, b).astype(a.dtype)
        return new

    dense = map_denses(params, change)
    if "token_embed_scale" in dense:
        scale = dense.pop("token_embed_scale")
        dense["token_embed"] = _dequantize(params["token_embed"].T, scale, 1, dtype).T
    if "lm_head_scale" in dense:
        dense["lm_head"] = _dequantize(params["lm_head"], dense.pop("lm_head_scale"), 1, dtype)
    return dense, plain_config(model_config)


def weight_bytes(params) -> int:
    """Bytes of every weight at its nominal width: an int4 weight is half a byte."""
    bits = sum(
        x.size * (jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer)
                  else jnp.finfo(x.dtype).bits)
        for x in jax.tree.leaves(params)
    )
    return math.ceil(bits / 8)
