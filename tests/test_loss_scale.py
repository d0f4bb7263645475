"""float16 loss scaling (training/loss_scale.py): the scale's rule, skipped overflows, underflow
rescued, float16 against float32, checkpoints and exact resume after SIGKILL."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training.dynamic_scale import DynamicScale

from checkpoints.layout import read_meta
from errors import UserError
from tests.helpers import random_batch, tiny_config
from tests.test_train_loop import read_metrics, start_train, wait_for
from training import loss_scale, vectorized
from training.checkpoint import Checkpointer
from training.trainer import Trainer

# xla attention's float16 dot (F16_F16_F32) has no CPU kernel; blockwise runs anywhere.
FLOAT16 = {"model.dtype": "float16", "model.attention_implementation": "blockwise"}


@pytest.fixture(scope="module")
def trainers():
    """trainer(dtype): tiny one-device Trainers, each built (and its steps compiled) once."""
    built = {}

    def get(dtype):
        if dtype not in built:
            config = tiny_config(dtype=dtype, attention_implementation="blockwise")
            config.train.update(num_steps=50, global_batch_size=8)
            config.mesh.update(data=1, fsdp=1, tensor=1)
            trainer = Trainer(config, devices=jax.devices()[:1])
            trainer.initial = jax.device_get(trainer.init_state())  # init compiles per call
            built[dtype] = trainer
        return built[dtype]

    return get


def fresh_state(trainer, **fields):
    """The initial state, anew (every step donates the state it is given), with these fields of
    its loss scale replaced (host values: placed like the step's own, so it does not recompile)."""
    state = trainer.initial
    if fields:
        state = state.replace(loss_scale=state.loss_scale.replace(**fields))
    return jax.device_put(state, trainer.shardings)


def batch_of(trainer, weight=1.0):
    """A random batch whose loss weights are all multiplied by `weight`."""
    batch = random_batch(trainer.config, seed=0)
    return dict(batch, weights=batch["weights"] * np.float32(weight))


def test_the_dynamic_rule_is_flax_dynamic_scale():
    """The same scale and count as flax's DynamicScale through growths, overflows and its floor
    (float32's smallest normal; started near it to get there in a few steps)."""
    initial = 2.0**-118
    rule = loss_scale.LossScale(dynamic=True, initial=initial, growth_interval=2)
    ours, flax_scale = rule.init(), DynamicScale(growth_interval=2, scale=initial)
    pattern = [True] * 7 + [False] + [True] * 3 + [False] * 12 + [True] * 2
    for finite in pattern:
        ours = rule.update(ours, jnp.bool_(True), jnp.bool_(finite))
        gradient = 1.0 if finite else np.inf
        flax_scale = flax_scale.value_and_grad(lambda p: p * gradient)(1.0).dynamic_scale
        assert float(ours.scale) == float(flax_scale.scale)
        assert int(ours.finite_steps) == int(flax_scale.fin_steps)
    assert float(ours.scale) == np.finfo(np.float32).tiny
    assert int(ours.skipped_steps) == pattern.count(False)


def test_which_runs_scale_and_what_is_refused():
    def resolve(value, dtype="float16", param_dtype="float32", platform="gpu"):
        train = tiny_config().train
        train.loss_scale = value
        model = tiny_config(dtype=dtype, param_dtype=param_dtype).model
        model.attention_implementation = "xla"
        return loss_scale.resolve(train, model, platform)

    assert resolve("auto") == loss_scale.LossScale(True, 2.0**16, 2000)
    assert resolve("static:1024") == loss_scale.LossScale(False, 1024.0, 0)
    assert resolve("auto", dtype="bfloat16") is None and resolve("none") is None
    refusals = [
        (dict(value="dynamic", dtype="bfloat16"), "train.loss_scale=dynamic with model.dtype"),
        (dict(value="static:8", dtype="float32"), "train.loss_scale=static:8 with model.dtype"),
        (dict(value="static:0"), "train.loss_scale='static:0': expected"),
        (dict(value="dynamc"), "train.loss_scale='dynamc': expected"),
        (dict(value="auto", param_dtype="float16"), "model.param_dtype=float16 with"),
        (dict(value="none", platform="tpu"), "model.dtype=float16 on TPU.*model.dtype=bfloat16"),
        (dict(value="auto", platform="cpu"), "float16 on CPU with .*attention_implementation=b"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(UserError, match=message):
            resolve(**kwargs)
    with pytest.raises(UserError, match=r"--vectorized: float16 loss scaling"):
        vectorized.run(
            tiny_config(dtype="float16", attention_implementation="blockwise"), "/x", {"a": {}}
        )


def test_an_overflow_is_skipped_and_halves_the_scale(trainers):
    """Huge loss weights: a finite float32 loss whose scaled float16 gradients overflow."""
    trainer = trainers("float16")
    state = fresh_state(trainer)
    before = jax.device_get(state)
    state, metrics = trainer.train_step(state, batch_of(trainer, 1e4))
    after = jax.device_get(state)
    assert bool(metrics["finite"]) and np.isfinite(metrics["loss"])  # the run goes on
    assert not np.isfinite(metrics["grad_norm"])
    for name in ("params", "opt_state"):  # bitwise unchanged
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    assert int(after.step) == 1  # the step and the schedule advance; the batch is consumed
    assert float(metrics["loss_scale"]) == float(after.loss_scale.scale) == 2.0**15
    assert int(metrics["skipped_steps"]) == 1 and int(after.loss_scale.finite_steps) == 0


def test_finite_steps_double_the_scale(trainers):
    """Started one step short of train.loss_scale_growth_interval (2000) finite steps."""
    trainer = trainers("float16")
    state = fresh_state(trainer, finite_steps=np.int32(1999))
    scales = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch_of(trainer))
        scales.append(float(metrics["loss_scale"]))
    assert scales == [2.0**16, 2.0**17, 2.0**17]
    assert int(state.loss_scale.skipped_steps) == 0 and int(state.loss_scale.finite_steps) == 1


def test_a_gradient_that_underflows_without_scaling_does_not_with_it(trainers):
    """Loss weights of 3e-9: float16 gradients of the unscaled loss flush to zero. A scale of
    `positions` differentiates the unscaled loss sum, exactly as train.loss_scale=none does
    (training/step.py: factor = scale / positions = 1), without compiling another step."""
    float16, float32 = trainers("float16"), trainers("float32")
    positions = float16.config.train.global_batch_size * float16.config.data.seq_len
    norms = {}
    for scale in (positions, 2.0**16):
        state = fresh_state(float16, scale=np.float32(scale))
        _, metrics = float16.train_step(state, batch_of(float16, 3e-9))
        norms[scale] = float(metrics["grad_norm"])
    _, metrics = float32.train_step(fresh_state(float32), batch_of(float32, 3e-9))
    reference = float(metrics["grad_norm"])
    assert norms[positions] == 0.0
    assert abs(norms[2.0**16] - reference) < 0.2 * reference, (norms, reference)


def test_float16_and_float32_losses_agree_over_50_steps(trainers):
    """Memorising one batch from init to a loss ~0.2: within 2e-3 at every step (seen: 6e-4)."""
    losses = {}
    for dtype in ("float16", "float32"):
        trainer = trainers(dtype)
        state, batch, losses[dtype] = fresh_state(trainer), batch_of(trainer), []
        for _ in range(50):
            state, metrics = trainer.train_step(state, batch)
            losses[dtype].append(float(metrics["loss"]))
        if dtype == "float16":
            assert int(metrics["skipped_steps"]) == 0 and float(metrics["loss_scale"]) == 2.0**16
    assert losses["float32"][-1] < 0.3 * losses["float32"][0]  # it trains
    np.testing.assert_allclose(losses["float16"], losses["float32"], atol=2e-3, rtol=0)


def test_checkpoints_keep_the_scale_and_old_ones_resume(trainers, tmp_path):
    """A float16 step's scale restores bitwise; a step saved without one (as every step saved
    before loss scaling existed) resumes with the initial scale; a run without drops it."""
    float16, float32 = trainers("float16"), trainers("float32")

    def save_and_restore(state, restorer, directory):
        checkpointer = Checkpointer(str(directory), keep=1, async_save=False)
        checkpointer.save(1, state, {}, {}, {})
        restored = checkpointer.restore_latest(restorer.abstract_state, {}, {})
        checkpointer.close()
        return restorer.resumed_state(restored), read_meta(checkpointer.directory, 1)

    state = fresh_state(float16)
    state, _ = float16.train_step(state, batch_of(float16, 1e4))  # overflow: 2^15, 1 skipped
    state, _ = float16.train_step(state, batch_of(float16))
    expected = jax.device_get(state.loss_scale)
    resumed, meta = save_and_restore(state, float16, tmp_path / "same")
    assert meta["loss_scale"] == {"scale": 2.0**15, "finite_steps": 1, "skipped_steps": 1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.loss_scale), expected)
    assert resumed.loss_scale.scale.dtype == jnp.float32

    old, meta = save_and_restore(fresh_state(float32), float16, tmp_path / "old")
    assert "loss_scale" not in meta
    assert float(old.loss_scale.scale) == 2.0**16 and int(old.loss_scale.skipped_steps) == 0
    float16.train_step(old, batch_of(float16))  # and it trains

    dropped, _ = save_and_restore(state, float32, tmp_path / "dropped")
    assert dropped.loss_scale is None


def test_the_scale_survives_sigkill_and_resume_exactly(tmp_path):
    """Growth interval 1: the scale doubles every other step until the gradients overflow, so
    the 12 steps grow, halve and skip; the resumed run logs them bitwise as the reference."""
    overrides = {
        **FLOAT16,
        "train.loss_scale_growth_interval": 1,
        "train.num_steps": 12,
        "checkpoint.every_steps": 3,
        "train.eval_every": 0,
    }
    reference = str(tmp_path / "reference")
    assert start_train(reference, **overrides).wait() == 0
    expected = read_metrics(reference)
    assert expected[12]["skipped_steps"] > 0  # overflows happened, and did not stop the run

    workdir = str(tmp_path / "interrupted")
    process = start_train(workdir, **overrides)
    wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "6")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(read_metrics(workdir)) < 12, "the run finished before it could be killed"
    resumed = start_train(workdir, **overrides)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "Restored checkpoint at step" in output
    actual = read_metrics(workdir)  # the resumed run's record of a step logged twice
    assert sorted(actual) == list(range(1, 13))
    for step in range(1, 13):  # bitwise (an overflow's grad_norm is inf or NaN)
        for name in ("loss", "loss_scale", "skipped_steps", "grad_norm"):
            np.testing.assert_array_equal(actual[step][name], expected[step][name], (step, name))
