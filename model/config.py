"""The model's hyperparameters: one frozen dataclass, checked and resolved on construction.

Every architectural variant (GPT-2 style, Llama style, anything in between) is a
choice of these fields; there is one model, not one per family. Derived values
are resolved once here (`num_kv_heads=0` becomes `num_heads`, `head_dim=0`
becomes `embed_dim // num_heads`), so the rest of the code reads one name per
quantity.
"""

import dataclasses
from typing import ClassVar

from config_schema import check_fields, field, from_values
from errors import UserError

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "swiglu", "geglu")
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable",
    "everything_saveable",
)
ATTENTION_IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "splash")
ATTENTION_MASKS = ("causal", "bidirectional", "prefix")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")
LOW_RANK_TARGETS = ("query", "key", "value", "out", "mlp")
ROUTER_NORMS = ("softmax_topk_renorm", "softmax_topk")
MOE_DISPATCHES = ("dropless", "capacity")
POSITIVE = "[1, inf)"
MOE_FIELDS = (
    "experts_per_token",
    "num_shared_experts",
    "moe_mlp_dim",
    "moe_every",
    "router_norm",
    "moe_dispatch",
    "capacity_factor",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyperparameters (field names match `config.model`)."""

    vocab_size: int = field(8192, POSITIVE, "output classes; >= the tokenizer's vocabulary")
    num_layers: int = field(4, POSITIVE, "transformer blocks")
    embed_dim: int = field(256, POSITIVE, "model width (residual stream)")
    num_heads: int = field(4, POSITIVE, "query heads")
    num_kv_heads: int = field(
        0, "[0, inf)", "key/value heads; fewer than num_heads = grouped-query; 0 = num_heads"
    )
    head_dim: int = field(0, "[0, inf)", "size of each head; 0 = embed_dim // num_heads")
    mlp_dim: int = field(1024, POSITIVE, "hidden width of the MLP")
    max_seq_len: int = field(1024, POSITIVE, "longest sequence (size of a learned position table)")
    position_embedding: str = field("learned", POSITION_EMBEDDINGS, "how positions are encoded")
    rope_theta: float = field(10000.0, "(0, inf)", "RoPE base wavelength")
    norm: str = field("layernorm", NORMS, "pre-norm type")
    norm_eps: float = field(1e-5, "(0, 1)", "epsilon of the norms")
    norm_plus_one: bool = field(
        False, bool, "RMSNorm scales stored as w and applied as (1 + w), w initialised to 0 (Gemma)"
    )
    mlp_activation: str = field(
        "gelu",
        MLP_ACTIVATIONS,
        "gelu (two matrices), swiglu or geglu (gated: three matrices, SiLU or GELU on the gate)",
    )
    gelu_approximate: bool = field(
        True, bool, "GELU's tanh approximation (GPT-2, Gemma); False = exact erf (ModernBERT)"
    )
    use_bias: bool = field(True, bool, "biases in projections and LayerNorm")
    qk_norm: bool = field(
        False, bool, "RMSNorm on each query and key head before RoPE (Qwen3, Qwen3-MoE)"
    )
    tie_embeddings: bool = field(True, bool, "output projection = token embedding transposed")
    embed_scale: bool = field(False, bool, "token embeddings times sqrt(embed_dim) (Gemma)")
    embed_norm: bool = field(False, bool, "a norm right after the embeddings (ModernBERT)")
    first_attn_norm: bool = field(
        True, bool, "False: layer 0 has no pre-attention norm (ModernBERT, after embed_norm)"
    )
    post_norms: bool = field(
        False, bool, "norms on the attention and MLP outputs too, before each residual add (Gemma)"
    )
    query_pre_attn_scalar: float = field(
        0.0, "[0, inf)", "attention scores scaled by its inverse square root; 0 = head_dim"
    )
    attn_logit_softcap: float = field(
        0.0, "[0, inf)", "attention scores -> cap x tanh(scores / cap) before the mask; 0 = off"
    )
    final_logit_softcap: float = field(
        0.0, "[0, inf)", "output logits -> cap x tanh(logits / cap); 0 = off (Gemma 2)"
    )
    sliding_window: int = field(
        0,
        "[0, inf)",
        "local layers (the L of attention_pattern) see only keys at distance < this many "
        "positions (causal: the last sliding_window keys); 0 = no local layers",
    )
    attention_pattern: str = field(
        "G",
        "text",
        "G (global) and L (local: sliding_window) per layer, repeated over the layers: "
        "GLL = ModernBERT, LG = Gemma 2, LLLLLG = Gemma 3",
    )
    local_rope_theta: float = field(
        0.0, "[0, inf)", "RoPE base of the local layers; 0 = rope_theta"
    )
    prediction_head: bool = field(
        False,
        bool,
        "a dense + GELU + norm transform before the output projection, which gains a bias "
        "(BERT's and ModernBERT's masked-LM head)",
    )
    dropout_rate: float = field(0.0, "[0, 1)", "dropout on embeddings and residual branches")
    init_std: float = field(0.02, "(0, inf)", "std of the normal initializer")
    dtype: str = field("bfloat16", DTYPES, "compute dtype (logits and loss are float32)")
    param_dtype: str = field("float32", DTYPES, "dtype the parameters are stored in")
    attention_implementation: str = field(
        "xla",
        ATTENTION_IMPLEMENTATIONS,
        "xla (dense reference), blockwise (flash-style, linear memory, any device), "
        "cudnn (NVIDIA GPUs) or splash (TPUs); see model/attention_ops.py",
    )
    attention_block_size: int = field(
        512, POSITIVE, "queries and keys per tile of blockwise and splash attention"
    )
    attention_mask: str = field(
        "causal",
        ATTENTION_MASKS,
        "which keys a token sees in its packed document: causal (earlier ones), bidirectional "
        "(all; masked LM) or prefix (bidirectional within the document's prefix, the batch's "
        "prefix_mask, causal after it; prefix LM); see model/attention_ops.py",
    )
    loss_chunk_size: int = field(
        0,
        "[0, inf)",
        "sequence positions whose logits the loss computes at a time; 0 = all at once",
    )
    remat_policy: str = field(
        "none", REMAT_POLICIES, "activation rematerialisation: none, full or a jax policy"
    )
    scan_unroll: int = field(
        1, POSITIVE, "layers per scan iteration; >= num_layers unrolls fully (faster on CPU)"
    )
    quantization: str = field(
        "none",
        QUANTIZATIONS,
        "weights of the layers' kernels stored as int8 (a scale per output channel) or int4 "
        "(a scale per quant_group_size inputs), dequantized before each matmul; compress.py "
        "writes such runs, for inference only",
    )
    quant_group_size: int = field(128, POSITIVE, "int4: input elements that share one scale")
    quantize_embeddings: bool = field(
        False, bool, "quantize the token embedding (so the tied output head) and lm_head too"
    )
    low_rank_ratio: float = field(
        0.0,
        "[0, 1]",
        "factorize the targeted kernels [in, out] as [in, r] x [r, out], r = "
        "ceil(ratio x min(in, out)); 0 = full kernels (compress.py --low_rank writes them)",
    )
    low_rank_targets: str = field(
        "query,key,value,out,mlp", "text", "kernels low_rank_ratio factorizes (comma-separated)"
    )
    encoder_layers: int = field(
        0,
        "[0, inf)",
        "> 0: an encoder-decoder: an encoder of this many bidirectional blocks (its own token "
        "embedding, the decoder's other fields) and num_layers decoder blocks with "
        "cross-attention; 0 = decoder-only",
    )
    encoder_sliding_window: int = field(
        0, "[0, inf)", "the encoder's local layers' window; 0 = sliding_window"
    )
    num_experts: int = field(
        0, "[0, inf)", "routed experts of the MoE layers (model/moe.py); 0 = dense MLPs"
    )
    experts_per_token: int = field(2, POSITIVE, "MoE: experts each token is routed to (top-k)")
    num_shared_experts: int = field(
        0, "[0, inf)", "MoE: always-on experts, one SwiGLU MLP of this many x moe_mlp_dim"
    )
    moe_mlp_dim: int = field(0, "[0, inf)", "MoE: hidden width of each expert; 0 = mlp_dim")
    moe_every: int = field(
        1, POSITIVE, "MoE: every n-th layer is MoE (the others dense); num_layers % n == 0"
    )
    router_norm: str = field(
        "softmax_topk_renorm",
        ROUTER_NORMS,
        "MoE: softmax then top-k, the k weights renormalised to sum to 1 (Mixtral) or not",
    )
    moe_dispatch: str = field(
        "dropless",
        MOE_DISPATCHES,
        "MoE: dropless (sorted tokens, grouped matmul) or capacity (fixed slots per expert, "
        "over-capacity assignments dropped by position)",
    )
    capacity_factor: float = field(
        1.25,
        "(0, inf)",
        "MoE capacity dispatch: slots per expert and batch shard = factor x the shard's tokens x "
        "k / experts",
    )

    # Fields that change how the model is computed, not what its weights are: a
    # checkpoint may be resumed or loaded with other values of these.
    COMPUTE_ONLY_FIELDS: ClassVar[tuple[str, ...]] = (
        "dtype",
        "attention_implementation",
        "attention_block_size",
        "attention_mask",
        "loss_chunk_size",
        "remat_policy",
        "scan_unroll",
        "dropout_rate",
        "moe_dispatch",
        "capacity_factor",
    )

    def __post_init__(self):
        check_fields(self, "model")

        def require(ok, name, message):
            if not ok:
                raise UserError(f"model.{name}={getattr(self, name)!r}: {message}")

        num_kv_heads = self.num_kv_heads or self.num_heads
        require(
            self.num_heads % num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be divisible by the number of KV heads.",
        )
        if self.head_dim == 0:
            require(
                self.embed_dim % self.num_heads == 0,
                "embed_dim",
                f"must be divisible by num_heads={self.num_heads} (or set model.head_dim).",
            )
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        if self.position_embedding == "rope":
            require(head_dim % 2 == 0, "head_dim", "rotary embeddings need an even head size.")
        object.__setattr__(self, "num_kv_heads", num_kv_heads)
        if not self.query_pre_attn_scalar:
            object.__setattr__(self, "query_pre_attn_scalar", float(head_dim))
        if self.encoder_layers and not self.encoder_sliding_window:
            object.__setattr__(self, "encoder_sliding_window", self.sliding_window)
        object.__setattr__(self, "head_dim", head_dim)
        unknown = set(self.low_rank_target_names) - set(LOW_RANK_TARGETS)
        require(
            not unknown and self.low_rank_target_names,
            "low_rank_targets",
            f"give comma-separated names of {', '.join(LOW_RANK_TARGETS)}.",
        )
        require(
            not (self.quantization == "int4" and self.low_rank_ratio),
            "quantization",
            "int4 groups do not fit factorized kernels (model.low_rank_ratio > 0); use int8.",
        )
        if self.quantization == "int4":  # the input sizes of every quantized kernel
            sizes = {
                "embed_dim": self.embed_dim,
                "num_heads x head_dim": self.num_heads * self.head_dim,
                "mlp_dim": self.mlp_dim,
            }
            require(
                all(size % self.quant_group_size == 0 for size in sizes.values()),
                "quant_group_size",
                "int4 groups must divide every quantized kernel's input size "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items())}); give a divisor.",
            )

        require(
            self.norm == "rmsnorm" or not self.norm_plus_one,
            "norm_plus_one",
            "the (1 + w) form is Gemma's RMSNorm; set model.norm=rmsnorm.",
        )
        self._check_local_attention(require)
        require(
            not self.encoder_layers or not self.num_experts,
            "encoder_layers",
            "an encoder-decoder with MoE layers is not supported; set model.num_experts=0.",
        )
        self._check_moe(require)
        if self.num_experts and not self.moe_mlp_dim:
            object.__setattr__(self, "moe_mlp_dim", self.mlp_dim)

    def _check_local_attention(self, require):
        require(
            self.sliding_window or not self.local_rope_theta,
            "local_rope_theta",
            "is the RoPE base of local layers: give model.sliding_window and L layers too.",
        )
        require(
            self.encoder_layers or not self.encoder_sliding_window,
            "encoder_sliding_window",
            "is an encoder-decoder's: set model.encoder_layers > 0, or leave it 0.",
        )
        require(
            set(self.attention_pattern) <= {"G", "L"},
            "attention_pattern",
            "give a string of G (global) and L (local) layers, e.g. LG.",
        )
        require(
            ("L" in self.attention_pattern) == (self.sliding_window > 0),
            "sliding_window",
            f"local layers (L in model.attention_pattern={self.attention_pattern!r}) need a "
            "window > 0, and a window needs local layers.",
        )

    def _check_moe(self, require):
        """MoE refusals: each names its field (the expert mesh axis is checked with the mesh)."""
        if not self.num_experts:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [n for n in MOE_FIELDS if getattr(self, n) != defaults[n]]
            used = ", model.".join(changed)
            require(not changed, "num_experts", f"set it (> 0) to use model.{used}.")
            return
        require(
            self.experts_per_token <= self.num_experts,
            "experts_per_token",
            f"top-k cannot exceed model.num_experts={self.num_experts}.",
        )
        require(
            self.num_layers % self.moe_every == 0,
            "moe_every",
            f"must divide model.num_layers={self.num_layers}.",
        )
        require(
            self.mlp_activation == "swiglu",
            "mlp_activation",
            "MoE experts are SwiGLU MLPs; set model.mlp_activation=swiglu.",
        )
        require(
            self.quantization == "none" and not self.low_rank_ratio,
            "num_experts",
            "MoE models cannot be quantized or factorized (model.quantization, "
            "model.low_rank_ratio); compress a dense model.",
        )

    def encoder(self) -> "ModelConfig":
        """The encoder's view of an encoder-decoder's config: its depth, bidirectional
        attention, its window; a stack of the same blocks without cross-attention."""
        return dataclasses.replace(
            self,
            num_layers=self.encoder_layers,
            encoder_layers=0,
            attention_mask="bidirectional",
            sliding_window=self.encoder_sliding_window,
            encoder_sliding_window=0,
        )

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by: query_pre_attn_scalar ** -0.5 (resolved: head_dim)."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def low_rank_target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.low_rank_targets.split(",") if t.strip())

    @classmethod
    def from_dict(cls, values) -> "ModelConfig":
        """Builds from `config.model` (a dict or ConfigDict), naming unknown keys."""
        return from_values(cls, values, "model")

    def weight_fields(self) -> dict:
        """The fields that determine the parameters: a checkpoint fits only if these match."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in self.COMPUTE_ONLY_FIELDS
        }
