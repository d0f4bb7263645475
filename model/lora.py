"""LoRA: low-rank adapters on the einsum kernels, trained while the base stays frozen.

Each targeted kernel W [layers, *in, *out] gets A [layers, *in, rank] (random) and
B [layers, rank, *out] (zeros), stacked over layers like W and named with W's
logical axes plus "lora_rank". A train step passes the adapters to the model as its
"lora" collection, B scaled by alpha / rank (`scaled`); each targeted Dense adds
x @ A @ B beside its kernel (model/layers.py), so neither W + A @ B nor W's gradient
is ever formed, and B = 0 makes step 0 exactly the base model. Sampling, eval and
export read `merged_params` = W + (alpha / rank) * A @ B, the same model in plain
kernels (checkpoints/read.py: load_run), with no special code.

A LoRA run's params are `{"base": model params, "lora": adapters}`; only the
adapters get gradients and optimizer state (training/step.py, training/state.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from config_schema import check_fields, field
from errors import UserError

# Target name -> (module path under "layers", kernel names, number of input axes).
TARGETS = {
    "query": (("attn", "query"), 1),
    "key": (("attn", "key"), 1),
    "value": (("attn", "value"), 1),
    "out": (("attn", "out"), 2),
    "mlp": (("mlp", "wi"), 1),
}
MLP_KERNELS = ("wi", "wi_gate", "wi_up", "wo")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`config.lora`: adapters instead of full fine-tuning when rank > 0."""

    rank: int = field(0, "[0, inf)", "adapter rank; 0 = off (full training)")
    alpha: float = field(16.0, "(0, inf)", "adapter scale is alpha / rank")
    dropout: float = field(0.0, "[0, 1)", "dropout on the adapters' input, in training only")
    targets: str = field(
        "query,value", "text", f"comma-separated kernels to adapt, of {', '.join(TARGETS)}"
    )

    def __post_init__(self):
        check_fields(self, "lora")


def is_lora_tree(params) -> bool:
    """True for a LoRA run's params ({"base", "lora"}), False for a model's own params."""
    return isinstance(params, dict) and set(params) == {"base", "lora"}


def trainable(params):
    """The part of params that trains: the adapters of a LoRA run, else everything."""
    return params["lora"] if is_lora_tree(params) else params


def _kernels(base, lora_config: LoraConfig) -> dict:
    """{(module, kernel name): number of input axes} of the targeted kernels in `base`."""
    names = [t.strip() for t in lora_config.targets.split(",") if t.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise UserError(
            f"lora.targets={lora_config.targets!r}: {unknown or 'nothing'} names no kernel; "
            f"give comma-separated names of {', '.join(TARGETS)}."
        )
    layers = base["layers"]
    chosen = {}
    for name in names:
        (module, kernel), num_in = TARGETS[name]
        kernels = [k for k in MLP_KERNELS if k in layers["mlp"]] if name == "mlp" else [kernel]
        chosen.update({(module, k): num_in for k in kernels})
    return chosen


def _value(x):
    return x.value if isinstance(x, nn.Partitioned) else x


def check_rank(lora_config: LoraConfig, base) -> None:
    """UserError if the rank exceeds a targeted kernel's input or output size."""
    for (module, name), num_in in _kernels(base, lora_config).items():
        shape = _value(base["layers"][module][name]["kernel"]).shape[1:]
        smallest = min(_size(shape[:num_in]), _size(shape[num_in:]))
        if lora_config.rank > smallest:
            raise UserError(
                f"lora.rank={lora_config.rank} is larger than layers/{module}/{name}/kernel's "
                f"input or output size ({smallest}); give lora.rank <= {smallest}."
            )


def _size(shape) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def init_adapters(rng, base, lora_config: LoraConfig) -> dict:
    """Adapters for the boxed (nn.Partitioned) `base` params, boxed with logical names."""
    check_rank(lora_config, base)
    adapters = {}
    for index, ((module, name), num_in) in enumerate(_kernels(base, lora_config).items()):
        kernel = base["layers"][module][name]["kernel"]
        layers, *dims = kernel.value.shape
        axis_names = kernel.names
        in_dims, out_dims = dims[:num_in], dims[num_in:]
        a = (
            jax.random.normal(
                jax.random.fold_in(rng, index),
                (layers, *in_dims, lora_config.rank),
                kernel.value.dtype,
            )
            / _size(in_dims) ** 0.5
        )
        b = jnp.zeros((layers, lora_config.rank, *out_dims), kernel.value.dtype)
        adapters.setdefault(module, {})[name] = {
            "a": kernel.replace(value=a, names=(*axis_names[: 1 + num_in], "lora_rank")),
            "b": kernel.replace(
                value=b, names=(axis_names[0], "lora_rank", *axis_names[1 + num_in :])
            ),
        }
    return {"layers": adapters}


def low_rank_product(a, b):
    """A [layers, *in, rank] @ B [layers, rank, *out] -> [layers, *in, *out] in float32,
    keeping the kernel's multi-axis layout (no reshapes); LoRA's delta and a factorized
    kernel multiplied back (compression/quantize.py)."""
    num_in, num_out = a.ndim - 2, b.ndim - 2
    ins, outs = "ijk"[:num_in], "xyz"[:num_out]
    equation = f"l{ins}r,lr{outs}->l{ins}{outs}"
    return jnp.einsum(
        equation,
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )


def merged_params(params, adapters, lora_config: LoraConfig):
    """`params` with W + (alpha / rank) * A @ B on each adapted kernel (computed in float32)."""
    scale = lora_config.alpha / lora_config.rank
    layers = dict(params["layers"])
    for module, kernels in adapters["layers"].items():
        layers[module] = dict(layers[module])
        for name, ab in kernels.items():
            kernel = layers[module][name]["kernel"]
            merged = kernel.astype(jnp.float32) + scale * low_rank_product(ab["a"], ab["b"])
            layers[module][name] = dict(layers[module][name], kernel=merged.astype(kernel.dtype))
    return dict(params, layers=layers)


def with_trainable(params, weights):
    """`params` with its trainable part (see `trainable`) replaced by `weights`."""
    return dict(params, lora=weights) if is_lora_tree(params) else weights


def scaled(adapters, lora_config: LoraConfig) -> dict:
    """The model's "lora" collection: `adapters` with each B times alpha / rank."""
    scale = lora_config.alpha / lora_config.rank
    return jax.tree.map(
        lambda ab: dict(ab, b=ab["b"] * scale),
        adapters,
        is_leaf=lambda node: isinstance(node, dict) and "b" in node,
    )


def adapter_output(equation: str, x, a, b):
    """x @ A @ B for a Dense of `equation` (e.g. "bthd,hde->bte") with one layer's A
    [*in, rank] and B [rank, *out]: two einsums through the rank axis."""
    inputs, output = equation.split("->")
    x_axes, kernel_axes = inputs.split(",")
    kernel_in = kernel_axes[: a.ndim - 1]
    rank = next(c for c in "rzyxwvu" if c not in equation)
    rows = "".join(c for c in x_axes if c not in kernel_in)
    low = jnp.einsum(f"{x_axes},{kernel_in}{rank}->{rows}{rank}", x, a)
    return jnp.einsum(f"{rows}{rank},{rank}{kernel_axes[a.ndim - 1 :]}->{output}", low, b)
