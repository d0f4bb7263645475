"""The device mesh: axes (stage, data, fsdp, expert, tensor), sizes from `config.mesh`.

Axis types are `Auto` (GSPMD-style): the model names logical axes, the rules in
sharding/rules.py map them onto these mesh axes, and XLA propagates the rest.
Changing parallelism means changing `config.mesh`, never the model.

`stage` is outermost: jax.make_mesh puts the first axis across hosts and slices, where
pipeline stages (few activations sent per step) cope with slow links best.
"""

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh

from config_schema import check_fields, field
from errors import UserError

MESH_AXES = ("stage", "data", "fsdp", "expert", "tensor")
OPTIONAL_AXES = ("stage", "expert")  # shown in messages only when used, as before they existed
AXIS_SIZE = "{-1} | [1, inf)"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: devices along each mesh axis; -1 = all remaining devices."""

    data: int = field(-1, AXIS_SIZE, "data parallelism (batch split, params replicated)")
    fsdp: int = field(1, AXIS_SIZE, "fully sharded data parallelism (batch and params split)")
    tensor: int = field(1, AXIS_SIZE, "tensor parallelism over heads, MLP and vocabulary")
    expert: int = field(
        1,
        AXIS_SIZE,
        "expert parallelism: MoE experts split, the batch too (data parallel elsewhere); "
        "must divide model.num_experts",
    )
    stage: int = field(
        1,
        AXIS_SIZE,
        "pipeline stages: the decoder layers split into consecutive groups, one per stage "
        "(see the pipeline section); the batch is not split over it",
    )

    def __post_init__(self):
        check_fields(self, "mesh")


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES; one size may be -1, meaning "the rest" (stage, expert: 1 if absent)."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    described = " x ".join(
        f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if a not in OPTIONAL_AXES or s != 1
    )
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(
            f"{described}: sizes must be positive, and at most one may be -1 "
            "(meaning: all remaining devices)."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(
                f"{described}: {num_devices} devices cannot be split into a mesh whose "
                f"other axes multiply to {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(
            f"{described} needs {math.prod(sizes)} devices, but {num_devices} are "
            "available. Make the product match, or set one axis to -1."
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
