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

from sharding import activate


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, rng, seq_len: int):
    """State whose leaves are still wrapped in their logical-axis metadata."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng}, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model, tx, mesh, rules, seq_len: int):
    """(abstract unboxed state, NamedShardings of the state) without allocating anything."""
    with activate(mesh, rules):
        boxed = jax.eval_shape(lambda rng: _boxed_init(model, tx, rng, seq_len), jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return nn.meta.unbox(boxed), shardings


def init_train_state(model, tx, mesh, rules, shardings, seed: int, seq_len: int) -> TrainState:
    """Initialises params and optimizer state directly into `shardings` (from state_shardings)."""
    init = jax.jit(
        lambda rng: nn.meta.unbox(_boxed_init(model, tx, rng, seq_len)), out_shardings=shardings
    )
    with activate(mesh, rules):
        return init(jax.random.key(seed))
