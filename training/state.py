"""Train state and its sharded initialisation.

The state is created inside `jax.jit` with `out_shardings` derived from the
parameters' logical axis names, so each device only ever allocates its own
shards: no host materialises the whole model.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model.lora import init_adapters, trainable
from sharding import activate


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, rng, seq_len: int, lora):
    """State whose leaves are still wrapped in their logical-axis metadata.

    With LoRA (`lora.rank` > 0) params are {"base", "lora"} and the optimizer state
    covers the adapters alone (model/lora.py).
    """
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng}, tokens)["params"]
    if lora is not None and lora.rank:
        params = {"base": params, "lora": init_adapters(jax.random.fold_in(rng, 1), params, lora)}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable(params))
    )


def state_shardings(model, tx, mesh, rules, seq_len: int, lora=None):
    """(abstract unboxed state, NamedShardings of the state) without allocating anything."""
    with activate(mesh, rules):
        boxed = jax.eval_shape(
            lambda rng: _boxed_init(model, tx, rng, seq_len, lora), jax.random.key(0)
        )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return nn.meta.unbox(boxed), shardings


def init_train_state(
    model, tx, mesh, rules, shardings, seed: int, seq_len: int, lora=None
) -> TrainState:
    """Initialises params and optimizer state directly into `shardings` (from state_shardings)."""
    init = jax.jit(
        lambda rng: nn.meta.unbox(_boxed_init(model, tx, rng, seq_len, lora)),
        out_shardings=shardings,
    )
    with activate(mesh, rules):
        return init(jax.random.key(seed))
