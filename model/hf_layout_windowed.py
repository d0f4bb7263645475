"""The Hugging Face families whose layers alternate global and sliding-window attention:
ModernBERT (a bidirectional masked LM), Gemma 2 and Gemma 3 (causal LMs; Gemma 3's text
model only) and T5Gemma (an encoder-decoder of two Gemma 2 stacks). Tables as in
model/hf_layout.py, plus each family's reading and writing of its per-layer attention
types, windows and RoPE bases, which are no plain renames.

HF writes a window in its own terms: Gemma 2's `sliding_window` w keeps the w latest
keys (0 <= i - j < w, meshlm's sliding_window = w); ModernBERT's `local_attention` a keeps
|i - j| <= a // 2 (meshlm's sliding_window = a // 2 + 1, as meshlm keeps |i - j| < window).
"""

import types

from errors import UserError
from model.config import ModelConfig
from model.hf_layout import LLAMA_NAMES, LLAMA_STYLE, Family, Tensor

LAYER_TYPES = {"full_attention": "G", "sliding_attention": "L"}


def attention_pattern(layer_types: list) -> str:
    """HF's per-layer types as meshlm's attention_pattern: the shortest that, repeated over
    the layers, gives them (GLL for ModernBERT's GLLG)."""
    letters = "".join(LAYER_TYPES[t] for t in layer_types)
    repeated = lambda unit: (unit * len(letters))[: len(letters)]
    return next(letters[:n] for n in range(1, len(letters) + 1) if repeated(letters[:n]) == letters)


def local_window(pattern: str, window):
    """A local layers' setting (sliding_window, local_rope_theta) when some layers are
    local, else 0: HF configs carry them even when every layer is global."""
    return window if "L" in pattern else 0


def layer_types(config: ModelConfig) -> list:
    """meshlm's attention_pattern over the model's layers, as HF's layer_types."""
    names = {letter: name for name, letter in LAYER_TYPES.items()}
    pattern = config.attention_pattern
    return [names[pattern[i % len(pattern)]] for i in range(config.num_layers)]


def _modernbert_layout(cfg: ModelConfig) -> dict:
    e, m, layer = cfg.embed_dim, cfg.mlp_dim, "model.layers.{i}."
    qkv = (3 * cfg.num_heads * cfg.head_dim, e)
    linear = lambda key, shape, **kw: Tensor(layer + key, shape, transpose=True, **kw)
    return {
        "token_embed": Tensor("model.embeddings.tok_embeddings.weight", (cfg.vocab_size, e)),
        "embed_norm/scale": Tensor("model.embeddings.norm.weight", (e,)),
        # Layer 0 has no attention norm: the embeddings' norm comes right before it.
        "layers/attn_norm/scale": Tensor(layer + "attn_norm.weight", (e,), from_layer=1),
        "layers/attn/query/kernel": linear("attn.Wqkv.weight", qkv, part=(0, 3)),
        "layers/attn/key/kernel": linear("attn.Wqkv.weight", qkv, part=(1, 3)),
        "layers/attn/value/kernel": linear("attn.Wqkv.weight", qkv, part=(2, 3)),
        "layers/attn/out/kernel": linear("attn.Wo.weight", (e, e)),
        "layers/mlp_norm/scale": Tensor(layer + "mlp_norm.weight", (e,)),
        # Wi's first half of rows is the activated branch, the second the linear one.
        "layers/mlp/wi_gate/kernel": linear("mlp.Wi.weight", (2 * m, e), part=(0, 2)),
        "layers/mlp/wi_up/kernel": linear("mlp.Wi.weight", (2 * m, e), part=(1, 2)),
        "layers/mlp/wo/kernel": linear("mlp.Wo.weight", (e, m)),
        "final_norm/scale": Tensor("model.final_norm.weight", (e,)),
        "head/kernel": Tensor("head.dense.weight", (e, e), transpose=True),
        "head_norm/scale": Tensor("head.norm.weight", (e,)),
        "output_bias": Tensor("decoder.bias", (cfg.vocab_size,)),
    }


def _modernbert_read(c) -> dict:
    every = getattr(c, "global_attn_every_n_layers", None) or 3
    types = getattr(c, "layer_types", None) or [
        "sliding_attention" if i % every else "full_attention"
        for i in range(c.num_hidden_layers)
    ]
    thetas = {"full_attention": getattr(c, "global_rope_theta", None) or 160000.0,
              "sliding_attention": getattr(c, "local_rope_theta", None) or 10000.0}
    for kind, rope in (getattr(c, "rope_parameters", None) or {}).items():
        thetas[kind] = rope.get("rope_theta", thetas[kind])  # its type: checked in model/hf.py
    pattern = attention_pattern(types)
    return dict(
        attention_pattern=pattern,
        sliding_window=local_window(pattern, (getattr(c, "local_attention", None) or 128) // 2 + 1),
        rope_theta=float(thetas["full_attention"]),
        local_rope_theta=local_window(pattern, float(thetas["sliding_attention"])),
    )


def _rope_per_type(config: ModelConfig) -> dict:
    """transformers 5's rope_parameters for global and local layers of their own bases."""
    local = config.local_rope_theta or config.rope_theta  # no local layers: unused
    thetas = {"full_attention": config.rope_theta, "sliding_attention": local}
    return {k: {"rope_type": "default", "rope_theta": v} for k, v in thetas.items()}


def _modernbert_write(config: ModelConfig, hf=None) -> dict:
    return dict(
        layer_types=layer_types(config),
        local_attention=2 * (config.sliding_window - 1),
        rope_parameters=_rope_per_type(config),
        global_rope_theta=config.rope_theta,
        local_rope_theta=config.local_rope_theta,
    )


MODERNBERT = Family(
    model_type="modernbert",
    architecture="ModernBertForMaskedLM",
    style=dict(
        position_embedding="rope",
        norm="layernorm",
        mlp_activation="geglu",
        gelu_approximate=False,
        use_bias=False,
        embed_norm=True,
        first_attn_norm=False,
        prediction_head=True,
        tie_embeddings=True,
        attention_mask="bidirectional",
    ),
    names=dict(
        vocab_size=("vocab_size", None),
        num_layers=("num_hidden_layers", None),
        embed_dim=("hidden_size", None),
        num_heads=("num_attention_heads", None),
        mlp_dim=("intermediate_size", None),
        max_seq_len=("max_position_embeddings", None),
        norm_eps=("norm_eps", 1e-5),
        init_std=("initializer_range", 0.02),
    ),
    implemented={
        "hidden_activation": ("gelu",),  # exact (erf) GELU, as the head's
        "classifier_activation": ("gelu",),
        "norm_bias": (False,),
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "classifier_bias": (False,),
        "decoder_bias": (True,),
        "tie_word_embeddings": (True,),
    },
    layout=_modernbert_layout,
    lm_head="decoder.weight",
    read=_modernbert_read,
    write=_modernbert_write,
)


GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm")


def _gemma_stack(cfg: ModelConfig, hf: str, ours: str = "", attn_norms=GEMMA2_NORMS,
                 encoder=False) -> dict:
    """A Gemma 2 style stack: embeddings, layers (four RMSNorms each, (1 + w): meshlm's
    model.norm_plus_one, so the weights load as they are), final norm;
    `hf` and `ours` prefix the HF and meshlm names, `attn_norms` are HF's pre and post
    attention norms' names."""
    e, m, h, kv, d = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = hf + "layers.{i}."
    norm = lambda key: Tensor(key + ".weight", (e,), encoder=encoder)
    linear = lambda key, shape: Tensor(layer + key, shape, transpose=True, encoder=encoder)
    return {
        ours + "token_embed": Tensor(hf + "embed_tokens.weight", (cfg.vocab_size, e)),
        ours + "layers/attn_norm/scale": norm(layer + attn_norms[0]),
        ours + "layers/post_attn_norm/scale": norm(layer + attn_norms[1]),
        ours + "layers/mlp_norm/scale": norm(layer + "pre_feedforward_layernorm"),
        ours + "layers/post_mlp_norm/scale": norm(layer + "post_feedforward_layernorm"),
        ours + "layers/attn/query/kernel": linear("self_attn.q_proj.weight", (h * d, e)),
        ours + "layers/attn/key/kernel": linear("self_attn.k_proj.weight", (kv * d, e)),
        ours + "layers/attn/value/kernel": linear("self_attn.v_proj.weight", (kv * d, e)),
        ours + "layers/attn/out/kernel": linear("self_attn.o_proj.weight", (e, h * d)),
        ours + "layers/mlp/wi_gate/kernel": linear("mlp.gate_proj.weight", (m, e)),
        ours + "layers/mlp/wi_up/kernel": linear("mlp.up_proj.weight", (m, e)),
        ours + "layers/mlp/wo/kernel": linear("mlp.down_proj.weight", (e, m)),
        ours + "final_norm/scale": norm(hf + "norm"),
    }


def _gemma2_layout(cfg: ModelConfig) -> dict:
    return _gemma_stack(cfg, "model.")


def _gemma2_read(c) -> dict:
    types = getattr(c, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(c.num_hidden_layers)
    ]
    pattern = attention_pattern(types)
    return dict(attention_pattern=pattern, sliding_window=local_window(pattern, c.sliding_window))


def _gemma2_write(config: ModelConfig, hf=None) -> dict:
    """Layer types and window; a soft-cap of 0 (none) as null, which transformers reads as
    none (0 would cap every logit to 0)."""
    caps = {"attn_logit_softcapping": config.attn_logit_softcap,
            "final_logit_softcapping": config.final_logit_softcap}
    return dict(
        {key: cap or None for key, cap in caps.items()},
        layer_types=layer_types(config),
        sliding_window=config.sliding_window or 4096,  # HF's default; no layer reads it
    )


GEMMA2 = Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    style=dict(
        LLAMA_STYLE,
        mlp_activation="geglu",
        gelu_approximate=True,
        qk_norm=False,
        embed_scale=True,
        post_norms=True,
        norm_plus_one=True,
    ),
    names=dict(
        LLAMA_NAMES,
        mlp_dim=("intermediate_size", None),
        tie_embeddings=("tie_word_embeddings", True),
        query_pre_attn_scalar=("query_pre_attn_scalar", 256.0),
        attn_logit_softcap=("attn_logit_softcapping", 0.0),  # null: no soft-capping
        final_logit_softcap=("final_logit_softcapping", 0.0),
    ),
    implemented={
        "hidden_activation": ("gelu_pytorch_tanh",),
        "attention_bias": (False,),
        "use_bidirectional_attention": (False, None),
    },
    layout=_gemma2_layout,
    read=_gemma2_read,
    write=_gemma2_write,
)

def _gemma3_layout(cfg: ModelConfig) -> dict:
    attn = "model.layers.{i}.self_attn."
    norm = lambda key: Tensor(attn + key, (cfg.head_dim,))
    return {
        **_gemma_stack(cfg, "model."),
        "layers/attn/query_norm/scale": norm("q_norm.weight"),
        "layers/attn/key_norm/scale": norm("k_norm.weight"),
    }


def _gemma3_read(c) -> dict:
    every = getattr(c, "sliding_window_pattern", None) or 6
    types = getattr(c, "layer_types", None) or [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention"
        for i in range(c.num_hidden_layers)
    ]
    rope = getattr(c, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}).get("rope_theta")
    local = float(local or getattr(c, "rope_local_base_freq", None) or 10000.0)
    pattern = attention_pattern(types)
    return dict(
        attention_pattern=pattern,
        sliding_window=local_window(pattern, c.sliding_window),
        local_rope_theta=local_window(pattern, local),
    )


def _gemma3_write(config: ModelConfig, hf=None) -> dict:
    written = dict(_gemma2_write(config), rope_parameters=_rope_per_type(config))
    del written["attn_logit_softcapping"]  # not Gemma 3's (see GEMMA3)
    return written


# Gemma 2 with (1 + w) q/k norms, local layers of their own RoPE base, usually no final
# soft-cap; transformers' Gemma 3 reads attn_logit_softcapping but never applies it, so
# neither does meshlm.
GEMMA3 = Family(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    style=dict(GEMMA2.style, qk_norm=True),
    names={k: v for k, v in GEMMA2.names.items() if k != "attn_logit_softcap"},
    implemented=GEMMA2.implemented,
    layout=_gemma3_layout,
    rope_theta=1e6,
    read=_gemma3_read,
    write=_gemma3_write,
)


def _t5gemma_layout(cfg: ModelConfig) -> dict:
    """T5Gemma: a Gemma 2 stack as encoder, another as decoder, whose layers gain
    cross-attention (no RoPE) between self-attention and the MLP, each sublayer pre- and
    post-normed."""
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self_norms = ("pre_self_attn_layernorm", "post_self_attn_layernorm")
    enc = _gemma_stack(cfg, "model.encoder.", "encoder/", self_norms, encoder=True)
    dec = _gemma_stack(cfg, "model.decoder.", "", self_norms)
    layer = "model.decoder.layers.{i}."
    cross = lambda key, shape: Tensor(layer + "cross_attn." + key, shape, transpose=True)
    norm = lambda key: Tensor(layer + key + ".weight", (e,))
    return {
        **enc,
        **dec,
        "layers/cross_norm/scale": norm("pre_cross_attn_layernorm"),
        "layers/post_cross_norm/scale": norm("post_cross_attn_layernorm"),
        "layers/cross_attn/query/kernel": cross("q_proj.weight", (h * d, e)),
        "layers/cross_attn/key/kernel": cross("k_proj.weight", (kv * d, e)),
        "layers/cross_attn/value/kernel": cross("v_proj.weight", (kv * d, e)),
        "layers/cross_attn/out/kernel": cross("o_proj.weight", (e, h * d)),
    }


# The fields an encoder-decoder's encoder shares with its decoder in meshlm (T5Gemma's may
# differ: refused).
SHARED_MODULE_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "rms_norm_eps", "hidden_activation", "max_position_embeddings", "vocab_size",
)


def sub_config(c, name: str):
    """A nested config (an object, or a dict when read from config.json) read by attribute."""
    sub = getattr(c, name, None)
    if sub is None:
        raise UserError(f"{c.model_type} config has no {name!r} section.")
    return types.SimpleNamespace(**sub) if isinstance(sub, dict) else sub


def _t5gemma_read(c) -> dict:
    encoder, decoder = (sub_config(c, name) for name in ("encoder", "decoder"))
    differ = [
        f"{key} {getattr(encoder, key, None)!r} vs {getattr(decoder, key, None)!r}"
        for key in SHARED_MODULE_KEYS
        if getattr(encoder, key, None) != getattr(decoder, key, None)
    ]
    if differ:
        raise UserError(
            "t5gemma config: meshlm's encoder shares the decoder's sizes and settings, but "
            f"encoder and decoder differ in {', '.join(differ)} (unbalanced T5Gemma models, "
            "e.g. 9B-2B, are not supported)."
        )
    encoder_fields = _gemma2_read(encoder)
    if encoder_fields["attention_pattern"] != _gemma2_read(decoder)["attention_pattern"]:
        raise UserError("t5gemma config: encoder and decoder layer types must follow one pattern.")
    return dict(
        _gemma2_read(decoder),
        encoder_layers=encoder.num_hidden_layers,
        # HF's encoder window keeps |i - j| <= w: meshlm's < w + 1.
        encoder_sliding_window=local_window(encoder_fields["attention_pattern"],
                                            encoder.sliding_window + 1),
        vocab_size=getattr(c, "vocab_size", None) or decoder.vocab_size,
        tie_embeddings=getattr(c, "tie_word_embeddings", True),
    )


def _t5gemma_write(config: ModelConfig, decoder: dict) -> dict:
    decoder.update(_gemma2_write(config), is_decoder=True)
    encoder = _gemma2_write(config.encoder())
    if config.encoder_sliding_window:
        encoder["sliding_window"] = config.encoder_sliding_window - 1
    return dict(
        encoder=dict(decoder, **encoder, num_hidden_layers=config.encoder_layers, is_decoder=False),
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        is_encoder_decoder=True,
    )


T5GEMMA = Family(
    model_type="t5gemma",
    architecture="T5GemmaForConditionalGeneration",
    style=GEMMA2.style,
    names={k: v for k, v in GEMMA2.names.items() if k != "tie_embeddings"},
    implemented=GEMMA2.implemented,
    layout=_t5gemma_layout,
    lm_head="lm_head.out_proj.weight",
    read=_t5gemma_read,
    write=_t5gemma_write,
    sub_config="decoder",
)

WINDOWED_FAMILIES = {f.model_type: f for f in (MODERNBERT, GEMMA2, GEMMA3, T5GEMMA)}
