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
from training.loss_scale import LossScaleState


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # float16 loss scaling (training/loss_scale.py); None when off, so that such a state
    # has exactly the leaves of one from before loss scaling existed.
    loss_scale: LossScaleState | None = None


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, rng, seq_len, lora, scale):
    """State whose leaves are still wrapped in their logical-axis metadata.

    With LoRA (`lora.rank` > 0) params are {"base", "lora"} and the optimizer state
    covers the adapters alone (model/lora.py). `scale` is the run's LossScale or None.
    """
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng}, tokens)["params"]
    if lora is not None and lora.rank:
        params = {"base": params, "lora": init_adapters(jax.random.fold_in(rng, 1), params, lora)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(trainable(params)),
        loss_scale=None if scale is None else scale.init(),
    )


def state_shardings(model, tx, mesh, rules, seq_len: int, lora=None, loss_scale=None):
    """(abstract unboxed state, NamedShardings of the state) without allocating anything."""
    with activate(mesh, rules):
        boxed = jax.eval_shape(
            lambda rng: _boxed_init(model, tx, rng, seq_len, lora, loss_scale), jax.random.key(0)
        )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return nn.meta.unbox(boxed), shardings


def init_train_state(
    model, tx, mesh, rules, shardings, seed: int, seq_len: int, lora=None, loss_scale=None
) -> TrainState:
    """Initialises params and optimizer state directly into `shardings` (from state_shardings)."""
    init = jax.jit(
        lambda rng: nn.meta.unbox(_boxed_init(model, tx, rng, seq_len, lora, loss_scale)),
        out_shardings=shardings,
    )
    with activate(mesh, rules):
        return init(jax.random.key(seed))
