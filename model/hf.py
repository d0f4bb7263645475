"""Hugging Face import: GPT-2 and Llama checkpoints -> meshlm `(ModelConfig, params)`.

    config = config_from_hf(hf_model.config, dtype="float32")
    params = params_from_hf(hf_model.state_dict(), config)
    logits = Transformer(config).apply({"params": params}, tokens)

or `config, params = from_hf(hf_model)`. Nothing here imports torch or
transformers: the state dict may hold torch tensors or numpy arrays, and the HF
config is read by attribute. Each family is one table, `_LAYOUTS[family]`,
mapping a meshlm parameter path (see model/transformer.py) to the HF tensor it
comes from, that tensor's expected shape and the transform into meshlm's
layout. A key with "{i}" is per layer; layers are stacked on a new leading axis.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from errors import UserError
from model.config import ModelConfig
from model.transformer import Transformer


def _field(hf_config, name, default=None):
    value = getattr(hf_config, name, default)
    return default if value is None else value


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """The ModelConfig of an HF GPT2Config / LlamaConfig; `overrides` set any other field."""
    c, family = hf_config, getattr(hf_config, "model_type", None)

    def require(ok, what):
        if not ok:
            raise UserError(f"{family} config: {what} is not supported by meshlm.")

    if family == "gpt2":
        require(
            _field(c, "activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
            f"activation_function={c.activation_function!r} (only tanh-approximated GELU)",
        )
        require(_field(c, "scale_attn_weights", True), "scale_attn_weights=False")
        require(
            not _field(c, "scale_attn_by_inverse_layer_idx", False),
            "scale_attn_by_inverse_layer_idx=True",
        )
        require(not _field(c, "add_cross_attention", False), "add_cross_attention=True")
        fields = dict(
            vocab_size=c.vocab_size,
            num_layers=c.n_layer,
            embed_dim=c.n_embd,
            num_heads=c.n_head,
            mlp_dim=_field(c, "n_inner", 4 * c.n_embd),
            max_seq_len=c.n_positions,
            position_embedding="learned",
            norm="layernorm",
            norm_eps=c.layer_norm_epsilon,
            mlp_activation="gelu",
            use_bias=True,
            tie_embeddings=_field(c, "tie_word_embeddings", True),
            init_std=c.initializer_range,
        )
    elif family == "llama":
        # transformers v5 keeps theta and scaling in rope_parameters; v4: rope_theta, rope_scaling.
        rope = dict(_field(c, "rope_parameters", None) or _field(c, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        require(rope_type == "default", f"rope scaling (rope_type={rope_type!r})")
        require(_field(c, "hidden_act", "silu") == "silu", f"hidden_act={c.hidden_act!r}")
        require(not _field(c, "attention_bias", False), "attention_bias=True")
        require(not _field(c, "mlp_bias", False), "mlp_bias=True")
        heads = c.num_attention_heads
        head_dim = _field(c, "head_dim", c.hidden_size // heads)
        fields = dict(
            vocab_size=c.vocab_size,
            num_layers=c.num_hidden_layers,
            embed_dim=c.hidden_size,
            num_heads=heads,
            num_kv_heads=_field(c, "num_key_value_heads", heads),
            head_dim=0 if head_dim * heads == c.hidden_size else head_dim,
            mlp_dim=c.intermediate_size,
            max_seq_len=c.max_position_embeddings,
            position_embedding="rope",
            rope_theta=float(rope.get("rope_theta", _field(c, "rope_theta", 10000.0))),
            norm="rmsnorm",
            norm_eps=c.rms_norm_eps,
            mlp_activation="swiglu",
            use_bias=False,
            tie_embeddings=_field(c, "tie_word_embeddings", False),
            init_std=c.initializer_range,
        )
    else:
        raise UserError(
            f"Unsupported Hugging Face model_type={family!r}; meshlm converts 'gpt2' and 'llama'."
        )
    return ModelConfig(**{**fields, **overrides})


def _gpt2_layout(cfg: ModelConfig) -> dict:
    e, h, d, m = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    qkv = lambda k: lambda w: w[..., k * e : (k + 1) * e].reshape(w.shape[:-1] + (h, d))
    same = None  # GPT-2's Conv1D weights are already [in, out], i.e. "x @ W".
    layout = {
        "token_embed": ("transformer.wte.weight", (cfg.vocab_size, e), same),
        "pos_embed": ("transformer.wpe.weight", (cfg.max_seq_len, e), same),
        "final_norm/scale": ("transformer.ln_f.weight", (e,), same),
        "final_norm/bias": ("transformer.ln_f.bias", (e,), same),
    }
    for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        for ours, theirs in (("scale", "weight"), ("bias", "bias")):
            layout[f"layers/{norm}/{ours}"] = (f"transformer.h.{{i}}.{ln}.{theirs}", (e,), same)
    for k, name in enumerate(("query", "key", "value")):  # c_attn packs [q | k | v] on its output.
        layout[f"layers/attn/{name}/kernel"] = (
            "transformer.h.{i}.attn.c_attn.weight",
            (e, 3 * e),
            qkv(k),
        )
        layout[f"layers/attn/{name}/bias"] = (
            "transformer.h.{i}.attn.c_attn.bias",
            (3 * e,),
            qkv(k),
        )
    layout.update(
        {
            "layers/attn/out/kernel": (
                "transformer.h.{i}.attn.c_proj.weight",
                (e, e),
                lambda w: w.reshape(h, d, e),
            ),
            "layers/attn/out/bias": ("transformer.h.{i}.attn.c_proj.bias", (e,), same),
            "layers/mlp/wi/kernel": ("transformer.h.{i}.mlp.c_fc.weight", (e, m), same),
            "layers/mlp/wi/bias": ("transformer.h.{i}.mlp.c_fc.bias", (m,), same),
            "layers/mlp/wo/kernel": ("transformer.h.{i}.mlp.c_proj.weight", (m, e), same),
            "layers/mlp/wo/bias": ("transformer.h.{i}.mlp.c_proj.bias", (e,), same),
        }
    )
    return layout


def _llama_layout(cfg: ModelConfig) -> dict:
    e, h, kv, d, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    # nn.Linear weights are [out, in]. HF q/k rows are already in apply_rope's "rotate half" order.
    heads_in = lambda n: lambda w: w.T.reshape(e, n, d)
    p = "model.layers.{i}."
    return {
        "token_embed": ("model.embed_tokens.weight", (cfg.vocab_size, e), None),
        "final_norm/scale": ("model.norm.weight", (e,), None),
        "layers/attn_norm/scale": (p + "input_layernorm.weight", (e,), None),
        "layers/mlp_norm/scale": (p + "post_attention_layernorm.weight", (e,), None),
        "layers/attn/query/kernel": (p + "self_attn.q_proj.weight", (h * d, e), heads_in(h)),
        "layers/attn/key/kernel": (p + "self_attn.k_proj.weight", (kv * d, e), heads_in(kv)),
        "layers/attn/value/kernel": (p + "self_attn.v_proj.weight", (kv * d, e), heads_in(kv)),
        "layers/attn/out/kernel": (
            p + "self_attn.o_proj.weight",
            (e, h * d),
            lambda w: w.T.reshape(h, d, e),
        ),
        "layers/mlp/wi_gate/kernel": (p + "mlp.gate_proj.weight", (m, e), np.transpose),
        "layers/mlp/wi_up/kernel": (p + "mlp.up_proj.weight", (m, e), np.transpose),
        "layers/mlp/wo/kernel": (p + "mlp.down_proj.weight", (e, m), np.transpose),
    }


_LAYOUTS = {"gpt2": _gpt2_layout, "llama": _llama_layout}
# Buffers and aliases that HF state dicts may carry and that hold no weights of their own.
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def _family(state_dict) -> str:
    for family, key in (("gpt2", "transformer.wte.weight"), ("llama", "model.embed_tokens.weight")):
        if key in state_dict:
            return family
    raise UserError(
        "State dict is neither a GPT2LMHeadModel ('transformer.wte.weight') nor "
        "a LlamaForCausalLM ('model.embed_tokens.weight') checkpoint."
    )


def _to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch.Tensor (any dtype, bfloat16 included)
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


def param_shapes(config: ModelConfig) -> dict:
    """`Transformer(config).init(...)["params"]` as ShapeDtypeStructs; nothing is allocated."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)
    return nn.meta.unbox(variables["params"])


def params_from_hf(state_dict, config: ModelConfig) -> dict:
    """meshlm params (numpy, config.param_dtype) from an HF GPT-2 / Llama `state_dict()`."""
    family = _family(state_dict)
    layout = _LAYOUTS[family](config)
    if not config.tie_embeddings:
        layout["lm_head"] = ("lm_head.weight", (config.vocab_size, config.embed_dim), np.transpose)
    dims = (
        f"vocab_size={config.vocab_size}, num_layers={config.num_layers}, "
        f"embed_dim={config.embed_dim}, num_heads={config.num_heads}, "
        f"kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, mlp_dim={config.mlp_dim}, "
        f"max_seq_len={config.max_seq_len}"
    )

    used = set()

    def load(key, shape, transform):
        if key not in state_dict:
            raise UserError(f"{family} state dict has no tensor {key!r} (model config: {dims}).")
        array = _to_numpy(state_dict[key])
        if array.shape != shape:
            raise UserError(
                f"{family} tensor {key!r} has shape {tuple(array.shape)}, expected "
                f"{shape} for model config {dims}."
            )
        used.add(key)
        return array if transform is None else transform(array)

    flat = {}
    for path, (key, shape, transform) in layout.items():
        if "{i}" in key:
            flat[path] = np.stack(
                [load(key.format(i=i), shape, transform) for i in range(config.num_layers)]
            )
        else:
            flat[path] = load(key, shape, transform)

    if config.tie_embeddings:
        used.add("lm_head.weight")  # HF lists the tied output projection under its own name too.
    unused = sorted(k for k in state_dict if k not in used and not _IGNORED.search(k))
    if unused:
        raise UserError(
            f"{family} state dict has {len(unused)} tensor(s) that model config "
            f"({dims}, tie_embeddings={config.tie_embeddings}) has no place for, "
            f"e.g. {unused[:5]}."
        )

    # Last line of defence: exactly the tree, shapes and dtypes the model itself initialises.
    expected = traverse_util.flatten_dict(param_shapes(config), sep="/")
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or extra:
        raise UserError(
            f"Converted params do not match the model: missing {missing}, unexpected {extra}."
        )
    for path, spec in expected.items():
        if flat[path].shape != spec.shape:
            raise UserError(
                f"Converted param {path!r} has shape {flat[path].shape}, the model "
                f"expects {spec.shape}."
            )
        flat[path] = np.ascontiguousarray(flat[path], dtype=spec.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def from_hf(hf_model, **overrides) -> tuple[ModelConfig, dict]:
    """`(config, params)` from an HF GPT2LMHeadModel / LlamaForCausalLM instance."""
    config = config_from_hf(hf_model.config, **overrides)
    return config, params_from_hf(hf_model.state_dict(), config)
