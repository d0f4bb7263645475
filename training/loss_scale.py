"""float16 loss scaling (`train.loss_scale`): which scale a run uses, its state, its update rule.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero, above 65504 they
overflow. The train step (training/step.py) multiplies each microbatch's loss by
`scale / positions` (positions = the microbatch's target positions, so `scale` is the
factor on the mean loss, as in flax and PyTorch), accumulates the float32 gradients,
divides them by the same factor, and checks the unscaled gradients once, by their global
norm, before clipping and the update (inside the optimizer).

A step whose gradients are not finite while its loss is (an overflow of the scaled
backward pass) is skipped: params and optimizer state stay bitwise as they were. Its
`state.step` still advances, like every step: the step counts the batches consumed (the
loop pairs step n with batch n, and a checkpoint at step n resumes at batch n + 1), and
the learning-rate schedule, a function of the step, advances with it, as with
`train.skip_nonfinite_updates`. A non-finite *loss* comes from the forward pass, which
no scale causes or cures: it stops the run as before (or is skipped by
`train.skip_nonfinite_updates`) and leaves the scale alone.

The dynamic rule is flax.training.dynamic_scale.DynamicScale's, written out because its
`value_and_grad` updates the scale at every gradient call, while a step of accumulated
microbatches decides once, after all of them: start at 2^16; on an overflow halve the
scale (not below float32's smallest normal) and restart the count of finite steps; once
`train.loss_scale_growth_interval` finite steps have passed in a row, the next finite
step doubles it. A static scale never changes; its overflowing steps are skipped too.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from errors import UserError

DYNAMIC_INITIAL_SCALE = 2.0**16  # flax's DynamicScale default
_TINY, _MAX = np.finfo(np.float32).tiny, np.finfo(np.float32).max


@flax.struct.dataclass
class LossScaleState:
    """Part of the train state (checkpointed in the step's meta, training/checkpoint.py)."""

    scale: jax.Array  # float32: the factor on the mean loss of the next step
    finite_steps: jax.Array  # int32: finite steps since the scale last changed
    skipped_steps: jax.Array  # int32: steps of the run skipped for non-finite gradients


@dataclasses.dataclass(frozen=True)
class LossScale:
    """A run's loss scaling: `dynamic` grows and shrinks the scale, else it stays `initial`."""

    dynamic: bool
    initial: float
    growth_interval: int

    def init(self) -> LossScaleState:
        return LossScaleState(
            scale=jnp.asarray(self.initial, jnp.float32),
            finite_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    def update(self, state: LossScaleState, loss_finite, grads_finite) -> LossScaleState:
        """The state after a step: skipped unless loss and gradients are finite; the scale
        moves only on steps whose loss is finite."""
        skipped = state.skipped_steps + (~(loss_finite & grads_finite)).astype(jnp.int32)
        if not self.dynamic:
            return state.replace(skipped_steps=skipped)
        grow = state.finite_steps == self.growth_interval
        grown = jnp.where(grow, jnp.minimum(state.scale * 2, _MAX), state.scale)
        scale = jnp.where(grads_finite, grown, jnp.maximum(state.scale * 0.5, _TINY))
        finite_steps = jnp.where(grow | ~grads_finite, 0, state.finite_steps + 1)
        kept = state.replace(skipped_steps=skipped)
        moved = LossScaleState(scale, finite_steps, skipped)
        return jax.tree.map(lambda new, old: jnp.where(loss_finite, new, old), moved, kept)


def resolve(train, model, platform: str) -> LossScale | None:
    """The run's LossScale (None: off) from train.loss_scale, or a UserError naming the field.

    `train`/`model` are the config's sections; `platform` is jax.default_backend().
    """
    if model.dtype == "float16" and platform == "tpu":
        raise UserError(
            "model.dtype=float16 on TPU: TPUs compute in bfloat16, which has float32's range "
            "and needs no loss scaling; use model.dtype=bfloat16."
        )
    if model.dtype == "float16" and platform == "cpu" and model.attention_implementation == "xla":
        raise UserError(
            "model.dtype=float16 on CPU with model.attention_implementation=xla: XLA:CPU has no "
            "float16 attention with float32 accumulation; use attention_implementation=blockwise."
        )
    value = train.loss_scale
    if value == "auto":
        value = "dynamic" if model.dtype == "float16" else "none"
    if value == "none":
        return None
    kind, _, number = value.partition(":")
    if value == "dynamic":
        scale = LossScale(True, DYNAMIC_INITIAL_SCALE, train.loss_scale_growth_interval)
    elif kind == "static" and _positive_float(number):
        scale = LossScale(False, float(number), 0)
    else:
        raise UserError(
            f"train.loss_scale={value!r}: expected auto, dynamic, static:<S> with S a positive "
            "number (e.g. static:1024), or none."
        )
    if model.dtype != "float16":
        raise UserError(
            f"train.loss_scale={value} with model.dtype={model.dtype}: loss scaling is for "
            "float16 compute (bfloat16 and float32 have float32's range); use "
            "train.loss_scale=auto or none."
        )
    if model.param_dtype != "float32":
        raise UserError(
            f"model.param_dtype={model.param_dtype} with train.loss_scale={value}: loss scaling "
            "needs float32 master weights and gradients (small updates vanish in float16 "
            "weights whatever the scale); use model.param_dtype=float32."
        )
    return scale


def _positive_float(text: str) -> bool:
    try:
        return 0 < float(text) < np.inf
    except ValueError:
        return False


def from_config(config, model_config) -> LossScale | None:
    """resolve() on this process's platform."""
    return resolve(config.train, model_config, jax.default_backend())


def to_json(state: LossScaleState) -> dict:
    """The state as exact JSON numbers (a float32 is exactly a double) for a checkpoint."""
    host = lambda x: np.asarray(x.addressable_data(0)).item()  # replicated: any shard
    return {f.name: host(getattr(state, f.name)) for f in dataclasses.fields(state)}


def resumed(config: LossScale | None, saved: dict | None, step: int) -> LossScaleState | None:
    """The state to resume (host values): the checkpoint's `saved` state (to_json), bitwise;
    the initial one for a checkpoint without (saved without loss scaling, or before it
    existed); None, dropping any saved state, when this run does not scale the loss."""
    if config is None:
        if saved is not None:
            logging.info("Checkpoint step %d's loss scale dropped: train.loss_scale is off.", step)
        return None
    if saved is None:
        logging.info(
            "Checkpoint step %d holds no loss-scale state: the scale starts at %g.",
            step,
            config.initial,
        )
        return jax.device_get(config.init())
    return LossScaleState(
        scale=np.float32(saved["scale"]),
        finite_steps=np.int32(saved["finite_steps"]),
        skipped_steps=np.int32(saved["skipped_steps"]),
    )
