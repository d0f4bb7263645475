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

Parameter paths are those of model/transformer.py. A key with "{i}" is per layer;
meshlm stacks the layers on a leading axis. The meshlm side of a `Tensor` takes
the model's own parameter shape, so the table names only the HF shapes.
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
    part: tuple[int, int] | None = None  # (k, n): the k-th of n equal slices of the last axis


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    style: dict
    names: dict
    implemented: dict
    layout: Callable[[ModelConfig], dict]


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


def _llama_layout(cfg: ModelConfig) -> dict:
    e, h, kv, d, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    linear = lambda key, shape: Tensor("model.layers.{i}." + key, shape, transpose=True)
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
        "layers/mlp/wi_gate/kernel": linear("mlp.gate_proj.weight", (m, e)),
        "layers/mlp/wi_up/kernel": linear("mlp.up_proj.weight", (m, e)),
        "layers/mlp/wo/kernel": linear("mlp.down_proj.weight", (e, m)),
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

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    style=dict(position_embedding="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False),
    names=dict(
        vocab_size=("vocab_size", None),
        num_layers=("num_hidden_layers", None),
        embed_dim=("hidden_size", None),
        num_heads=("num_attention_heads", None),
        num_kv_heads=("num_key_value_heads", 0),  # 0: as many as query heads
        head_dim=("head_dim", 0),  # 0: hidden_size // num_attention_heads
        mlp_dim=("intermediate_size", None),
        max_seq_len=("max_position_embeddings", None),
        norm_eps=("rms_norm_eps", 1e-6),
        tie_embeddings=("tie_word_embeddings", False),
        init_std=("initializer_range", 0.02),
    ),
    implemented={"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)},
    layout=_llama_layout,
)

FAMILIES = {family.model_type: family for family in (GPT2, LLAMA)}
# Buffers that HF state dicts may carry and that hold no weights of their own.
IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
LM_HEAD = "lm_head.weight"  # both families' untied output projection


def tensor_layout(family: Family, cfg: ModelConfig) -> dict:
    """The family's table for `cfg`, with the output projection when it is untied."""
    layout = family.layout(cfg)
    if not cfg.tie_embeddings:
        layout["lm_head"] = Tensor(LM_HEAD, (cfg.vocab_size, cfg.embed_dim), transpose=True)
    return layout
