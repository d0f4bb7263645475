"""Device mesh, logical-axis rules and the shardings derived from them."""

from sharding.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from sharding.rules import (
    DEFAULT_RULES,
    activate,
    batch_sharding,
    logical_rules,
    logical_sharding,
    replicated,
)

__all__ = [
    "MESH_AXES",
    "make_mesh",
    "resolve_mesh_shape",
    "DEFAULT_RULES",
    "activate",
    "batch_sharding",
    "logical_rules",
    "logical_sharding",
    "replicated",
]
