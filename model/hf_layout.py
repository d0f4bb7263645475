"""The Hugging Face families meshlm reads and writes: one table each.

model/hf.py converts in both directions from these tables alone, so import and
export cannot disagree. A `Family` gives:

  style        the ModelConfig fields every meshlm model of the family has; they
               pick the family on export
  names        ModelConfig field -> (HF config key, value when the key is absent
               or null; None = required), carried over as is in both directions
  implemented  HF config keys whose values meshlm implements: the first is HF's
               default (assumed when absent) and the one export writes
  layout       meshlm parameter path -> `Tensor`, where it lives in the HF state dict
  moe          whether the family's models are mixtures of experts (model.num_experts > 0)
  choices      ModelConfig field -> (HF config key, {HF value: meshlm value}); the
               first HF value is HF's default
  aliases      HF config key -> the other name transformers may write it under
  fused        how transformers 5 holds the experts in memory (see `Fused`)
  rope_theta   RoPE's base when the config gives none
  lm_head      the output projection's HF name
  read, write  the family's own config conversions, where a key is no plain rename
               (per-layer attention types, per-type RoPE bases): HF config -> fields,
               ModelConfig -> HF keys
  sub_config   an encoder-decoder's nested config that holds the plain keys

Parameter paths are those of model/transformer.py. A key with "{i}" is per layer;
meshlm stacks the layers on a leading axis. One with "{j}" is also per expert: HF
files keep one tensor per expert, meshlm stacks them on the axis after the layers.
The meshlm side of a `Tensor` takes the model's own parameter shape, so the table
names only the HF shapes.
"""

import dataclasses
import re
from typing import Callable, NamedTuple

from model.config import ModelConfig


class Tensor(NamedTuple):
    """Where one meshlm parameter (one layer's slice of it) is in an HF state dict."""

    key: str  # the HF name; "{i}" is the layer index
    shape: tuple[int, ...]  # the HF tensor's shape
    transpose: bool = False  # torch's nn.Linear stores [out, in]; meshlm kernels are [in, out]
    # (k, n): the k-th of n equal slices of the output axis (the last of a GPT-2 Conv1D, the
    # first of a transposed nn.Linear)
    part: tuple[int, int] | None = None
    from_layer: int = 0  # HF has it from this layer on; meshlm's earlier layers hold ones
    encoder: bool = False  # "{i}" counts an encoder-decoder's encoder layers


class Fused(NamedTuple):
    """A tensor of a file's per-expert layout that transformers 5 holds fused in memory
    (`model.state_dict()`, or files saved with save_original_format=False): the k-th of
    n equal row blocks of `key`, after taking expert j of it when the name has "{j}"."""

    key: str  # the in-memory name; "{i}" is the layer index
    part: tuple[int, int] = (0, 1)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    style: dict
    names: dict
    implemented: dict
    layout: Callable[[ModelConfig], dict]
    moe: bool = False
    choices: dict = dataclasses.field(default_factory=dict)
    aliases: dict = dataclasses.field(default_factory=dict)
    fused: dict = dataclasses.field(default_factory=dict)  # file name pattern -> `Fused`
    rope_theta: float = 10000.0  # when the config has none
    lm_head: str = "lm_head.weight"  # the output projection (tied ones are listed too)
    read: Callable | None = None  # (HF config) -> dict of ModelConfig fields
    write: Callable | None = None  # (ModelConfig, the HF keys so far) -> more HF keys
    # The nested config the names, implemented keys and RoPE are read from and written to
    # (T5Gemma's "decoder"); `write`'s keys then go on the top level.
    sub_config: str = ""


def _gpt2_layout(cfg: ModelConfig) -> dict:
    # GPT-2's Conv1D weights are already [in, out], i.e. "x @ W": nothing is transposed.
    e, m, h = cfg.embed_dim, cfg.mlp_dim, "transformer.h.{i}."
    layout = {
        "token_embed": Tensor("transformer.wte.weight", (cfg.vocab_size, e)),
        "pos_embed": Tensor("transformer.wpe.weight", (cfg.max_seq_len, e)),
        "final_norm/scale": Tensor("transformer.ln_f.weight", (e,)),
        "final_norm/bias": Tensor("transformer.ln_f.bias", (e,)),
        "layers/attn/out/kernel": Tensor(h + "attn.c_proj.weight", (e, e)),
        "layers/attn/out/bias": Tensor(h + "attn.c_proj.bias", (e,)),
        "layers/mlp/wi/kernel": Tensor(h + "mlp.c_fc.weight", (e, m)),
        "layers/mlp/wi/bias": Tensor(h + "mlp.c_fc.bias", (m,)),
        "layers/mlp/wo/kernel": Tensor(h + "mlp.c_proj.weight", (m, e)),
        "layers/mlp/wo/bias": Tensor(h + "mlp.c_proj.bias", (e,)),
    }
    for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        layout[f"layers/{norm}/scale"] = Tensor(f"{h}{ln}.weight", (e,))
        layout[f"layers/{norm}/bias"] = Tensor(f"{h}{ln}.bias", (e,))
    for k, name in enumerate(("query", "key", "value")):  # c_attn packs [q | k | v] on its output.
        layout[f"layers/attn/{name}/kernel"] = Tensor(
            h + "attn.c_attn.weight", (e, 3 * e), part=(k, 3)
        )
        layout[f"layers/attn/{name}/bias"] = Tensor(h + "attn.c_attn.bias", (3 * e,), part=(k, 3))
    return layout


def _linear(key: str, shape: tuple) -> Tensor:
    """A torch nn.Linear weight of layer {i} ([out, in]: transposed)."""
    return Tensor("model.layers.{i}." + key, shape, transpose=True)


def _llama_layout(cfg: ModelConfig) -> dict:
    m = cfg.mlp_dim
    return {
        **_llama_attention_layout(cfg),
        "layers/mlp/wi_gate/kernel": _linear("mlp.gate_proj.weight", (m, cfg.embed_dim)),
        "layers/mlp/wi_up/kernel": _linear("mlp.up_proj.weight", (m, cfg.embed_dim)),
        "layers/mlp/wo/kernel": _linear("mlp.down_proj.weight", (cfg.embed_dim, m)),
    }


def _llama_attention_layout(cfg: ModelConfig) -> dict:
    """Everything of a Llama-style model but its MLPs."""
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linear = _linear
    return {
        "token_embed": Tensor("model.embed_tokens.weight", (cfg.vocab_size, e)),
        "final_norm/scale": Tensor("model.norm.weight", (e,)),
        "layers/attn_norm/scale": Tensor("model.layers.{i}.input_layernorm.weight", (e,)),
        "layers/mlp_norm/scale": Tensor("model.layers.{i}.post_attention_layernorm.weight", (e,)),
        # HF's q/k rows are already in apply_rope's "rotate half" order.
        "layers/attn/query/kernel": linear("self_attn.q_proj.weight", (h * d, e)),
        "layers/attn/key/kernel": linear("self_attn.k_proj.weight", (kv * d, e)),
        "layers/attn/value/kernel": linear("self_attn.v_proj.weight", (kv * d, e)),
        "layers/attn/out/kernel": linear("self_attn.o_proj.weight", (e, h * d)),
    }


def _experts_layout(cfg: ModelConfig, block: str, names: tuple[str, str, str]) -> dict:
    """The router and the routed SwiGLU experts of a MoE layer, as the HF files keep them:
    `block` + "gate.weight" [experts, embed], then per expert j the (gate, up, down)
    projections `names`."""
    e, m = cfg.embed_dim, cfg.moe_mlp_dim
    expert = lambda name, shape: _linear(f"{block}experts.{{j}}.{name}.weight", shape)
    return {
        "layers/moe/router/kernel": _linear(block + "gate.weight", (cfg.num_experts, e)),
        "layers/moe/wi_gate/kernel": expert(names[0], (m, e)),
        "layers/moe/wi_up/kernel": expert(names[1], (m, e)),
        "layers/moe/wo/kernel": expert(names[2], (e, m)),
    }


def _mixtral_layout(cfg: ModelConfig) -> dict:
    return {
        **_llama_attention_layout(cfg),
        **_experts_layout(cfg, "block_sparse_moe.", ("w1", "w3", "w2")),
    }


def _qk_norm_layout(cfg: ModelConfig) -> dict:
    """Qwen3's RMSNorm of each query and key head, before RoPE."""
    d, attn = cfg.head_dim, "model.layers.{i}.self_attn."
    return {
        "layers/attn/query_norm/scale": Tensor(attn + "q_norm.weight", (d,)),
        "layers/attn/key_norm/scale": Tensor(attn + "k_norm.weight", (d,)),
    }


def _qwen3_layout(cfg: ModelConfig) -> dict:
    return {**_llama_layout(cfg), **_qk_norm_layout(cfg)}


def _qwen3_moe_layout(cfg: ModelConfig) -> dict:
    return {
        **_llama_attention_layout(cfg),
        **_qk_norm_layout(cfg),
        **_experts_layout(cfg, "mlp.", ("gate_proj", "up_proj", "down_proj")),
    }


def _fused_experts(block: str, names: tuple[str, str, str]) -> dict:
    """transformers 5's in-memory experts: "mlp.experts.gate_up_proj" [experts, 2 x moe_mlp,
    embed] (gate rows, then up rows) and "mlp.experts.down_proj" [experts, embed, moe_mlp]."""
    layer, experts = "model.layers.{i}.", "model.layers.{i}.mlp.experts."
    return {
        f"{layer}{block}gate.weight": Fused(layer + "mlp.gate.weight"),
        f"{layer}{block}experts.{{j}}.{names[0]}.weight": Fused(experts + "gate_up_proj", (0, 2)),
        f"{layer}{block}experts.{{j}}.{names[1]}.weight": Fused(experts + "gate_up_proj", (1, 2)),
        f"{layer}{block}experts.{{j}}.{names[2]}.weight": Fused(experts + "down_proj"),
    }


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    style=dict(
        position_embedding="learned", norm="layernorm", mlp_activation="gelu", use_bias=True
    ),
    names=dict(
        vocab_size=("vocab_size", None),
        num_layers=("n_layer", None),
        embed_dim=("n_embd", None),
        num_heads=("n_head", None),
        mlp_dim=("n_inner", None),  # null in HF means 4 * n_embd (model/hf.py)
        max_seq_len=("n_positions", None),
        norm_eps=("layer_norm_epsilon", 1e-5),
        tie_embeddings=("tie_word_embeddings", True),
        init_std=("initializer_range", 0.02),
    ),
    implemented={
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # tanh-approximated GELU
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    },
    layout=_gpt2_layout,
)

LLAMA_STYLE = dict(
    position_embedding="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False
)
# The config keys Llama, Qwen3, Mixtral and Qwen3-MoE share.
LLAMA_NAMES = dict(
    vocab_size=("vocab_size", None),
    num_layers=("num_hidden_layers", None),
    embed_dim=("hidden_size", None),
    num_heads=("num_attention_heads", None),
    num_kv_heads=("num_key_value_heads", 0),  # 0: as many as query heads
    head_dim=("head_dim", 0),  # 0: hidden_size // num_attention_heads
    max_seq_len=("max_position_embeddings", None),
    norm_eps=("rms_norm_eps", 1e-6),
    tie_embeddings=("tie_word_embeddings", False),
    init_std=("initializer_range", 0.02),
)
# Routed experts only, in every layer (shared experts and dense layers are other models).
MOE_STYLE = dict(num_shared_experts=0, moe_every=1)

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    style=dict(LLAMA_STYLE, qk_norm=False),
    names=dict(LLAMA_NAMES, mlp_dim=("intermediate_size", None)),
    implemented={"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)},
    layout=_llama_layout,
)

# Llama with per-head q/k RMSNorm.
QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    style=dict(LLAMA_STYLE, qk_norm=True),
    names=dict(LLAMA_NAMES, mlp_dim=("intermediate_size", None)),
    implemented={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "use_sliding_window": (False,),
    },
    layout=_qwen3_layout,
)

# Softmax over the experts, the top k renormalised to sum to 1.
MIXTRAL = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    style=dict(LLAMA_STYLE, **MOE_STYLE, qk_norm=False, router_norm="softmax_topk_renorm"),
    names=dict(
        LLAMA_NAMES,
        norm_eps=("rms_norm_eps", 1e-5),
        moe_mlp_dim=("intermediate_size", None),  # each expert's width: Mixtral has no dense MLP
        num_experts=("num_local_experts", None),
        experts_per_token=("num_experts_per_tok", None),
    ),
    implemented={
        "hidden_act": ("silu",),
        "router_jitter_noise": (0.0,),  # multiplicative noise on the router's input in training
        "sliding_window": (None,),  # meshlm attends to the whole causal context
    },
    layout=_mixtral_layout,
    moe=True,
    fused=_fused_experts("block_sparse_moe.", ("w1", "w3", "w2")),
    rope_theta=1e6,
)

# Per-head q/k RMSNorm; softmax over the experts, the top k renormalised iff norm_topk_prob.
QWEN3_MOE = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    style=dict(LLAMA_STYLE, **MOE_STYLE, qk_norm=True),
    names=dict(
        LLAMA_NAMES,
        mlp_dim=("intermediate_size", None),  # the dense MLP of mlp_only_layers: none here
        moe_mlp_dim=("moe_intermediate_size", None),
        num_experts=("num_experts", None),
        experts_per_token=("num_experts_per_tok", None),
    ),
    implemented={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "use_sliding_window": (False,),
        "decoder_sparse_step": (1,),  # every layer is MoE
        "mlp_only_layers": ([],),
    },
    layout=_qwen3_moe_layout,
    moe=True,
    choices={
        "router_norm": ("norm_topk_prob", {False: "softmax_topk", True: "softmax_topk_renorm"})
    },
    aliases={"num_experts": "num_local_experts"},  # what transformers 5 writes
    fused=_fused_experts("mlp.", ("gate_proj", "up_proj", "down_proj")),
)

FAMILIES = {f.model_type: f for f in (GPT2, LLAMA, QWEN3, MIXTRAL, QWEN3_MOE)}
# HF mixtures of experts that compute something meshlm does not: refused with the reason.
DIFFERENT_MOE = {
    "qwen2_moe": "its shared expert's output is scaled by a sigmoid gate (shared_expert_gate)",
    "deepseek_v3": "its router scores experts with a sigmoid plus a bias correction and picks "
    "the top k within groups",
    "olmoe": "its q/k RMSNorm spans all heads at once (meshlm normalises each head, as Qwen3)",
}
# Buffers that HF state dicts may carry and that hold no weights of their own.
IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def tensor_layout(family: Family, cfg: ModelConfig) -> dict:
    """The family's table for `cfg`, with the output projection when it is untied."""
    layout = family.layout(cfg)
    if not cfg.tie_embeddings:
        layout["lm_head"] = Tensor(family.lm_head, (cfg.vocab_size, cfg.embed_dim), transpose=True)
    return layout
