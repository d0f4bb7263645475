"""A LoRA run's checkpoints: the adapters at every step, the frozen base once per workdir.

A LoRA run's params are {"base", "lora"} (model/lora.py) and the base never changes,
so each step's params item holds `{"lora": adapters}` alone, beside the adapters'
optimizer state, data position and meta as in any step. The base is written once,
before the run's first step checkpoint, to `<workdir>/lora_base` (a params-only orbax
checkpoint, uncompressed like checkpoints/write.py's; orbax writes it to a temporary
directory and renames it, so it is there whole or not at all). The workdir stays
self-contained: resuming reads both, and checkpoints/read.py's `load_params` merges them.
"""

import jax
import orbax.checkpoint as ocp

from checkpoints.layout import drop_abandoned_read_reports, first_line
from errors import UserError
from model.lora import LoraConfig, is_lora_tree, merged_params
from paths import workdir_path

BASE_DIR = "lora_base"


def stored(params):
    """What a step's params item holds: a LoRA run's adapters alone, else `params`."""
    return {"lora": params["lora"]} if is_lora_tree(params) else params


def is_adapters(tree) -> bool:
    """True for a LoRA step's params item (see `stored`)."""
    return isinstance(tree, dict) and set(tree) == {"lora"}


def base_path(workdir: str):
    return workdir_path(workdir) / BASE_DIR


def save_base(workdir: str, base) -> None:
    """Writes the frozen base, replacing one that an earlier run left without steps."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save(base_path(workdir), args=ocp.args.PyTreeSave(base), force=True)


def load_base(workdir: str, abstract_base, step_dir: str):
    """The frozen base onto `abstract_base`'s shardings; UserError naming the path if it
    cannot be read (`step_dir`: the step that needs it)."""
    path = base_path(workdir)
    drop_abandoned_read_reports()
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path, args=ocp.args.StandardRestore(abstract_base))
    except Exception as error:  # noqa: BLE001 -- missing or corrupt: the same to the user
        raise UserError(
            f"LoRA checkpoint {step_dir} holds the adapters only; the frozen base model they "
            f"were trained on, {path}, is missing or cannot be read ({first_line(error)}). "
            "Put that directory back, or train in a new --workdir."
        ) from None


def restore_target(abstract_params, saved_tree):
    """What a step's params item restores into, for load_params: `abstract_params`
    (ShapeDtypeStructs with shardings), or a LoRA step's saved adapters, replicated."""
    if not is_adapters(saved_tree):
        return abstract_params
    sharding = jax.tree.leaves(abstract_params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved_tree
    )


def merged(workdir: str, adapters: dict, abstract_params, lora_values: dict, step_dir: str):
    """A LoRA step's restored `{"lora": adapters}` and the workdir's base, merged
    (`lora_values`: its config's lora section) onto `abstract_params`' shardings."""
    base = load_base(workdir, abstract_params, step_dir)
    params = merged_params(base, adapters["lora"], LoraConfig(**lora_values))
    return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract_params)
