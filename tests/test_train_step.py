"""The sharded train step: sharded == unsharded, FSDP memory, accumulation, start-up errors."""

import jax
import numpy as np
import pytest

from errors import UserError
from tests.helpers import LLAMA_STYLE, random_batch, setup, tiny_config
from training.config import validate_config


def run_three_steps(config, mesh_shape):
    """Three steps on one batch, from the warmup-free peak rate, so every step moves the params."""
    _, state, step = setup(config, mesh_shape)
    initial = jax.device_get(state.params)
    batch = random_batch(config, seed=0)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), initial


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sharded_training_matches_a_single_device(family):
    config = tiny_config(**(LLAMA_STYLE if family == "llama" else {}))
    config.optimizer.warmup_steps = 0
    ref_losses, ref_params, initial = run_three_steps(config, (1, 1, 1))
    assert ref_losses[2] < ref_losses[1] < ref_losses[0]  # the steps train, not just run
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), ref_params, initial)
    assert all(jax.tree.leaves(changed))  # so agreeing params means agreeing updates
    # Every axis alone at 8 and all three together; pure data parallelism (params replicated)
    # does not depend on the family, and llama's 4 KV heads take tensor=4, not 8.
    meshes = {
        "gpt2": [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)],
        "llama": [(1, 8, 1), (1, 2, 4), (2, 2, 2)],
    }[family]
    for mesh_shape in meshes:
        losses, params, _ = run_three_steps(config, mesh_shape)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=str(mesh_shape))
        # Adam turns float-rounding differences of near-zero gradients into small update
        # differences; a wrong sharding would differ by the update size (~1e-2).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


def test_fsdp_shards_params_and_optimizer_state():
    # Biases without an `embed` axis stay replicated (they are tiny at real widths).
    config = tiny_config(embed_dim=128, mlp_dim=512, num_heads=4)
    _, state, _ = setup(config, (1, 8, 1))
    arrays = jax.tree.leaves((state.params, state.opt_state))
    total = sum(x.nbytes for x in arrays)
    device = jax.devices()[0]
    on_device = sum(
        s.data.nbytes for x in arrays for s in x.addressable_shards if s.device == device
    )
    assert on_device <= total / 8 * 1.05, (on_device, total)


def test_gradient_accumulation_equals_one_large_batch():
    config = tiny_config()
    config.optimizer.warmup_steps = 0  # a zero step-0 rate would leave both params unchanged
    batch = random_batch(config, seed=3)
    _, state, step = setup(config, (2, 2, 2))
    initial = jax.device_get(state.params)
    one_batch, m1 = step(state, batch)
    config.train.num_microbatches = 4
    _, state, step = setup(config, (2, 2, 2))
    accumulated, m4 = step(state, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), atol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
        jax.device_get(one_batch.params),
        jax.device_get(accumulated.params),
    )
    assert float(m4["num_tokens"]) == batch["weights"].sum()
    moved = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), jax.device_get(one_batch.params), initial
    )
    assert all(jax.tree.leaves(moved))  # so agreeing params means agreeing updates


def test_a_skipped_update_keeps_the_learning_rate_on_schedule():
    """With skip_nonfinite_updates, step 2 (a NaN loss) is skipped; step 3 must then apply
    the rate of step index 2, the rate it logs, not the rate of the one update before it."""
    config = tiny_config()
    config.train.skip_nonfinite_updates = True
    config.optimizer.warmup_steps = 3  # rates 0, 1/3, 2/3 of the peak: each step differs
    good = random_batch(config, seed=1)
    nan = dict(good, weights=np.full_like(good["weights"], np.nan))
    _, state, step = setup(config, (1, 1, 1))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    state, _ = step(state, random_batch(config, seed=0))
    after_one = jax.device_get(state)
    state, skipped = step(state, nan)
    assert not bool(skipped["finite"]) and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), after_one.params)
    state, metrics = step(state, good)
    _, _, schedule = make_optimizer_for(config)
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(2)))

    # The same update from the step-1 state with its step counter set to 2 is identical...
    reference = jax.device_put(after_one.replace(step=np.int32(2)), shardings)
    reference, _ = step(reference, good)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(state.params),
        jax.device_get(reference.params),
    )
    # ...and differs from applying the step-1 rate, which the skipped step must not leave behind.
    lagging, _ = step(jax.device_put(after_one, shardings), good)
    assert not np.allclose(
        jax.device_get(lagging.params)["final_norm"]["scale"],
        jax.device_get(state.params)["final_norm"]["scale"],
    )


def make_optimizer_for(config):
    from training.optimizer import make_optimizer

    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
    return config, tx, schedule


def test_metrics_are_reported():
    config = tiny_config()
    _, state, step = setup(config)
    state, metrics = step(state, random_batch(config))
    assert set(metrics) >= {"loss", "learning_rate", "grad_norm", "param_norm", "num_tokens"}
    assert int(state.step) == 1
    assert float(metrics["learning_rate"]) == 0.0  # warmup starts at zero
    assert float(metrics["param_norm"]) > 0


@pytest.mark.parametrize(
    "section, overrides, message",
    [
        ("mesh", dict(data=3), r"mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 needs 3 devices, but 8"),
        ("mesh", dict(data=-1, fsdp=3), r"cannot be split"),
        (
            "train",
            dict(global_batch_size=12),
            r"train.global_batch_size=12 .* mesh.data\*mesh.fsdp=8",
        ),
        ("train", dict(num_microbatches=3), r"not divisible by train.num_microbatches=3"),
        ("model", dict(num_heads=8, num_kv_heads=3), r"model.num_kv_heads=3"),
        ("model", dict(embed_dim=30), r"model.embed_dim=30"),
        ("data", dict(seq_len=64), r"data.seq_len=64 is longer than model.max_seq_len=16"),
    ],
)
def test_bad_configs_are_rejected_at_start_up(section, overrides, message):
    config = tiny_config()
    config[section].update(overrides)
    with pytest.raises(UserError, match=message):
        validate_config(config, num_devices=8)


def test_a_mesh_whose_batch_axes_do_not_split_over_the_processes_is_refused():
    config = tiny_config()
    config.mesh.update(data=1, fsdp=1, tensor=8)  # the batch would be fed twice, differently
    with pytest.raises(UserError, match=r"mesh.data\*mesh.fsdp=1 does not split over the 2"):
        validate_config(config, num_devices=8, process_count=2)
    config.mesh.update(data=1, fsdp=2, tensor=4)
    validate_config(config, num_devices=8, process_count=2)


def test_tiny_config_is_valid():
    assert validate_config(tiny_config(), num_devices=8).num_layers == 2
