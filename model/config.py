"""The model's hyperparameters, one frozen dataclass, validated on construction.

Every architectural variant (GPT-2 style, Llama style, anything in between) is a
choice of these fields; there is one model, not one per family.
"""

import dataclasses

import jax.numpy as jnp

from errors import UserError

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "swiglu")
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
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyperparameters (field names match `config.model`)."""

    vocab_size: int = 8192
    num_layers: int = 4
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention.
    head_dim: int = 0  # 0 = embed_dim // num_heads.
    mlp_dim: int = 1024
    max_seq_len: int = 1024
    position_embedding: str = "learned"  # learned | sinusoidal | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm (always pre-norm)
    norm_eps: float = 1e-5
    mlp_activation: str = "gelu"  # gelu (tanh approximation, as GPT-2) | swiglu
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    attention_implementation: str = "xla"  # xla (any device) | cudnn (NVIDIA GPUs)
    remat_policy: str = "none"  # none | full | a jax.checkpoint_policies name
    scan_unroll: int = 1  # layers per scan iteration; >= num_layers unrolls fully (faster on CPU)

    def __post_init__(self):
        def check(ok, field, message):
            if not ok:
                raise UserError(f"model.{field}={getattr(self, field)!r}: {message}")

        for field in (
            "vocab_size",
            "num_layers",
            "embed_dim",
            "num_heads",
            "mlp_dim",
            "max_seq_len",
        ):
            check(getattr(self, field) > 0, field, "must be positive.")
        check(
            self.position_embedding in POSITION_EMBEDDINGS,
            "position_embedding",
            f"must be one of {POSITION_EMBEDDINGS}.",
        )
        check(self.norm in NORMS, "norm", f"must be one of {NORMS}.")
        check(
            self.mlp_activation in MLP_ACTIVATIONS,
            "mlp_activation",
            f"must be one of {MLP_ACTIVATIONS}.",
        )
        check(
            self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}."
        )
        check(
            self.attention_implementation in ATTENTION_IMPLEMENTATIONS,
            "attention_implementation",
            f"must be one of {ATTENTION_IMPLEMENTATIONS}.",
        )
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}.")
        check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}.")
        check(0.0 <= self.dropout_rate < 1.0, "dropout_rate", "must be in [0, 1).")
        check(self.scan_unroll >= 1, "scan_unroll", "must be >= 1 (>= num_layers unrolls fully).")
        check(self.num_kv_heads >= 0, "num_kv_heads", "must be >= 0 (0 means num_heads).")
        check(
            self.num_heads % self.kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be divisible by the number of KV heads.",
        )
        if self.head_dim == 0:
            check(
                self.embed_dim % self.num_heads == 0,
                "embed_dim",
                f"must be divisible by num_heads={self.num_heads} (or set model.head_dim).",
            )
        if self.position_embedding == "rope":
            check(self.head_size % 2 == 0, "head_dim", "rotary embeddings need an even head size.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values) -> "ModelConfig":
        """Builds from `config.model` (a dict or ConfigDict), naming unknown keys."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"Unknown model config key(s) {unknown}; known keys: {sorted(known)}.")
        return cls(**values)
