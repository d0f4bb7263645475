"""Building blocks of the transformer: norms, position encodings, the MLP.

Every parameter is created with logical axis names (see sharding/rules.py), as
many names as the parameter has dimensions.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import quantize
from model.config import ModelConfig
from model.lora import adapter_output


def param_init(config: ModelConfig, names, std=None):
    """A normal initializer that carries logical axis names for sharding."""
    return nn.with_logical_partitioning(nn.initializers.normal(std or config.init_std), names)


def zeros_init(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def make_norm(config: ModelConfig, name: str, axis: str = "embed") -> nn.Module:
    """A norm over the last axis (logically named `axis`): LayerNorm (GPT-2) or RMSNorm
    (Llama; Gemma's (1 + w) form with model.norm_plus_one); statistics in float32."""
    if config.norm == "rmsnorm" and config.norm_plus_one:
        return PlusOneRMSNorm(config, axis, name=name)
    common = dict(
        epsilon=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
        scale_init=ones_init((axis,)),
    )
    if config.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(use_bias=config.use_bias, bias_init=zeros_init((axis,)), **common)


class PlusOneRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + scale), in float32, the scale initialised to 0, so
    its checkpoints' norm weights load as they are."""

    config: ModelConfig
    axis: str = "embed"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", zeros_init((self.axis,)), (x.shape[-1],), cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + cfg.norm_eps)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(cfg.dtype)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """Fixed sin/cos position encodings ("Attention is all you need"), [..., dim]."""
    half = dim // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    encoding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(encoding, [(0, 0)] * positions.ndim + [(0, dim - 2 * half)])


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on [batch, length, heads, head_dim], in float32.

    Uses the "rotate half" layout (first half of head_dim paired with the second
    half), which is the layout of Hugging Face Llama checkpoints.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [b, t, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def weight(module, name, shape, names, num_in, init, quantized=True, transposed=False):
    """Declares the weight `name` and returns it in the compute dtype.

    A float param; or, with model.quantization (and `quantized`), an int8/int4 param
    and its float32 scale `name + "_scale"`, dequantized here, just before the matmul
    (model/quantize.py). `num_in` leading axes are the input; `transposed` marks a
    2-D weight stored [out, in] (the token embedding, whose rows are output channels
    of the tied head).
    """
    cfg = module.config
    method = cfg.quantization if quantized else "none"
    if method == "none":
        return module.param(name, init, shape, cfg.param_dtype).astype(cfg.dtype)
    view_shape, view_names = (shape[::-1], names[::-1]) if transposed else (shape, names)
    q = module.param(name, zeros_init(names), shape, quantize.DTYPES[method])
    scale = module.param(
        f"{name}_scale",
        ones_init(quantize.scale_names(method, view_names, num_in)),
        quantize.scale_shape(method, view_shape, num_in, cfg.quant_group_size),
        jnp.float32,
    )
    w = quantize.dequantize(q.T if transposed else q, scale, num_in, cfg.dtype)
    return w.T if transposed else w


def low_rank(config: ModelConfig, shape, num_in: int) -> int:
    """The rank of a factorized kernel [*in, *out]: ceil(ratio x min(in, out)), at least 1."""
    smallest = min(math.prod(shape[:num_in]), math.prod(shape[num_in:]))
    return max(1, math.ceil(config.low_rank_ratio * smallest))


def target_name(module_name: str) -> str:
    """The model.low_rank_targets / lora.targets name of a Dense: query, key, value, out, mlp."""
    return "mlp" if module_name in ("wi", "wi_gate", "wi_up", "wo") else module_name


def dot(equation: str, x, kernel, num_in: int, out_type=None) -> jax.Array:
    """`einsum(equation, x, kernel)` for x [..., *in] @ kernel [*in, *out] -> [..., *out], in
    `out_type` (None: the operands'); on CPU through `matmul`, whose kernel gradient
    transposes the smaller operand. GPU and TPU dots take transposed operands as they are."""
    if jax.default_backend() == "cpu":
        return matmul(equation, x, kernel, num_in, out_type)
    return jnp.einsum(equation, x, kernel, preferred_element_type=out_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def matmul(equation: str, x: jax.Array, kernel: jax.Array, num_in: int, out_type) -> jax.Array:
    """`dot` whose kernel gradient transposes the smaller of x and the output gradient.

    XLA:CPU's dot wants one operand of the kernel gradient's contraction (over all
    tokens) transposed and picks it itself: in a GELU MLP it picks the [tokens, mlp]
    gradient and fuses the transpose into the activation's backward, which it then
    computes twice, once transposed, 30-50x slower than untransposed; at the tied output
    head it copies the [tokens, vocab] logits' gradient transposed (BENCHMARKS.md, "meshlm
    vs PyTorch"). The forward and the input gradient are einsum's own.
    """
    return jnp.einsum(equation, x, kernel, preferred_element_type=out_type)


def _matmul_fwd(equation, x, kernel, num_in, out_type):
    # symbolic_zeros: a frozen kernel (a LoRA base) gets no gradient computed at all
    x, kernel, trained = x.value, kernel.value, kernel.perturbed
    return matmul(equation, x, kernel, num_in, out_type), (x, kernel, trained)


def _matmul_bwd(equation, num_in, out_type, residuals, dy):
    x, kernel, trained = residuals
    forward = lambda x: jnp.einsum(equation, x, kernel, preferred_element_type=out_type)
    dx = jax.linear_transpose(forward, x)(dy)[0]
    if not trained:
        return dx, None
    size_in = math.prod(kernel.shape[:num_in])
    x2, dy2 = x.reshape(-1, size_in), dy.reshape(-1, kernel.size // size_in)
    barrier = jax.lax.optimization_barrier  # keeps XLA from moving the transposes back
    if x2.shape[1] <= dy2.shape[1]:
        dkernel = barrier(x2.T) @ dy2
    else:
        dkernel = barrier(barrier(dy2.T) @ x2).T
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


class Dense(nn.Module):
    """`einsum(equation, x, kernel) (+ bias)` with a logically named kernel.

    Multi-axis kernels such as [embed, heads, head_dim] keep each axis (and its
    sharding name) instead of being flattened to 2-D. The first `len(shape) -
    bias_rank` kernel axes are the input, the last `bias_rank` the output (the
    bias spans them). The kernel is a float param, or int8/int4 with scales
    (model.quantization), or two factors `kernel_a` [*in, rank] and `kernel_b`
    [rank, *out] when model.low_rank_ratio > 0 names this kernel in
    model.low_rank_targets (compress.py writes them). When the "lora" collection
    holds adapters "a" and "b" for this module, their low-rank path is added beside
    the kernel (model/lora.py), its input dropped out at rate `lora_dropout`. When
    the "calibration" ("calibration_gram") collection is mutable, the module adds its
    inputs' squared sums (Gram matrix) there, for pruning and whitened SVD.
    """

    config: ModelConfig
    equation: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    bias_rank: int = 1
    init_std: float | None = None
    lora_dropout: float = 0.0  # 0 outside training

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        num_in = len(self.shape) - self.bias_rank
        self._calibrate(x, num_in)
        x = x.astype(cfg.dtype)
        std = self.init_std or cfg.init_std
        if cfg.low_rank_ratio and target_name(self.name) in cfg.low_rank_target_names:
            rank = low_rank(cfg, self.shape, num_in)
            ins, outs = self.shape[:num_in], self.shape[num_in:]
            in_names, out_names = self.names[:num_in], self.names[num_in:]
            factor_init = lambda names: param_init(cfg, names, (std * std / rank) ** 0.25)
            a = weight(self, "kernel_a", (*ins, rank), (*in_names, "low_rank"), num_in,
                       factor_init((*in_names, "low_rank")))
            b = weight(self, "kernel_b", (rank, *outs), ("low_rank", *out_names), 1,
                       factor_init(("low_rank", *out_names)))
            y = adapter_output(self.equation, x, a, b)
        else:
            kernel = weight(
                self, "kernel", self.shape, self.names, num_in, param_init(cfg, self.names, std)
            )
            y = dot(self.equation, x, kernel, num_in)
        if self.has_variable("lora", "a"):
            a, b = (self.get_variable("lora", n).astype(cfg.dtype) for n in ("a", "b"))
            dropped = nn.Dropout(self.lora_dropout, deterministic=self.lora_dropout == 0.0)(x)
            y = y + adapter_output(self.equation, dropped, a, b)
        if cfg.use_bias:
            out_names = self.names[-self.bias_rank :]
            bias = self.param(
                "bias", zeros_init(out_names), self.shape[-self.bias_rank :], cfg.param_dtype
            )
            y = y + bias.astype(cfg.dtype)
        return y

    def _calibrate(self, x, num_in: int) -> None:
        """Adds x's per-input-feature squared sums (and Gram matrix) to the calibration
        collections when they are mutable (compression/calibrate.py)."""
        in_shape = self.shape[:num_in]
        rows = lambda: x.astype(jnp.float32).reshape(-1, math.prod(in_shape))
        if self.is_mutable_collection("calibration"):
            sums = self.variable("calibration", "sum_squares", jnp.zeros, in_shape, jnp.float32)
            sums.value = sums.value + jnp.sum(jnp.square(rows()), axis=0).reshape(in_shape)
        if self.is_mutable_collection("calibration_gram"):
            size = math.prod(in_shape)
            gram = self.variable("calibration_gram", "gram", jnp.zeros, (size, size), jnp.float32)
            gram.value = gram.value + rows().T @ rows()


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap x tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2); cap 0 = x."""
    return cap * jnp.tanh(x / cap) if cap else x


def gelu(config: ModelConfig, x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=config.gelu_approximate)


def residual_init_std(config: ModelConfig) -> float:
    """GPT-2's scaled init of residual-branch outputs keeps the stream's variance flat."""
    return config.init_std / (2 * config.num_layers) ** 0.5


class Mlp(nn.Module):
    """Position-wise feed-forward: GELU (two matrices), or SwiGLU or GeGLU (three: an
    activated gate times a linear "up" projection)."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        up_shape, up_names = (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp")
        dense = functools.partial(Dense, cfg, lora_dropout=self.lora_dropout)
        up = lambda name: dense("bte,em->btm", up_shape, up_names, name=name)(x)
        if cfg.mlp_activation == "gelu":
            hidden = gelu(cfg, up("wi"))
        else:
            gate = nn.silu if cfg.mlp_activation == "swiglu" else functools.partial(gelu, cfg)
            hidden = gate(up("wi_gate")) * up("wi_up")
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(
            "btm,me->bte",
            (cfg.mlp_dim, cfg.embed_dim),
            ("mlp", "embed"),
            init_std=residual_init_std(cfg),
            name="wo",
        )(hidden)
