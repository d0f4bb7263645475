"""One table mapping the model's logical axis names onto mesh axes.

Rules are read in order, and a mesh axis is used at most once per array, so an
activation [batch, length, embed] takes (data, fsdp) for `batch` and leaves
`embed` unsharded, while a parameter [embed, mlp] is sharded over fsdp and
tensor. Override entries from the command line with `config.sharding_rules`,
e.g. "vocab=,embed=fsdp" (an empty right side means replicated; join several
mesh axes with '+').
"""

import contextlib

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from errors import UserError

DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # data parallel: FSDP and expert split it too
    ("length", None),
    ("embed", "fsdp"),  # parameters: FSDP shards the model dimension
    ("heads", "tensor"),  # tensor parallelism (Megatron-style) over heads and mlp
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),  # model/moe.py: expert parallelism over the routed experts
    ("moe_mlp", "tensor"),  # each expert's hidden width, as mlp
    ("layers", None),  # the scanned-layers axis stays whole on every device
    ("stage", "stage"),  # pipelined runs (model/pipeline.py): the layers split into stages
    ("lora_rank", None),  # model/lora.py: adapters' rank axis is small, kept whole
    ("low_rank", None),  # model.low_rank_ratio: factorized kernels' rank axis
    ("quant_groups", None),  # model/quantize.py: int4 scales' groups along the input
    ("trials", "data"),  # sweep.py --vectorized: trials stacked on a leading axis
)
# The known trap: sharding the scanned layers over `stage` runs every layer on every device,
# all-gathering each layer's weights in turn (FSDP over layers), with no pipelining at all.
_LAYERS_ON_STAGE = (
    "sharding_rules={overrides!r}: layers=stage does not pipeline; it shards the scanned layers "
    "over mesh.stage, and every device then all-gathers each layer's weights in turn (FSDP over "
    "layers). Drop it and set mesh.stage plus the pipeline.* fields (pipeline.microbatches, "
    "pipeline.schedule) instead."
)


def logical_rules(overrides: str = "") -> tuple:
    """The default table with `name=axis[+axis]` entries from `overrides` replacing theirs."""
    rules = dict(DEFAULT_RULES)
    for entry in filter(None, (e.strip() for e in overrides.split(","))):
        name, sep, axes = entry.partition("=")
        if not sep or name.strip() not in rules:
            raise UserError(
                f"sharding_rules={overrides!r}: cannot read {entry!r}; expected "
                f"name=axis with name one of {sorted(rules)}."
            )
        axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        if name.strip() == "layers" and "stage" in axes:
            raise UserError(_LAYERS_ON_STAGE.format(overrides=overrides))
        rules[name.strip()] = axes[0] if len(axes) == 1 else (axes or None)
    return tuple(rules.items())


def rule_axes(axes) -> tuple:
    """A rule's mesh axes (None, one name or a tuple of names) as a tuple."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def logical_sharding(mesh, rules, logical_names) -> NamedSharding:
    """NamedSharding for one array described by logical axis names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_names, rules))


def batch_sharding(mesh, rules) -> NamedSharding:
    """Sharding of [batch, length] input arrays."""
    return logical_sharding(mesh, rules, ("batch", "length"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh, rules):
    """Makes `mesh` and `rules` current, so the model's logical constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
