"""The sharded train step: sharded == unsharded, FSDP memory, accumulation, start-up errors."""

import jax
import numpy as np
import pytest

from errors import UserError
from tests.helpers import LLAMA_STYLE, random_batch, setup, tiny_config
from training.config import validate_config


def run_two_steps(config, mesh_shape):
    _, state, step = setup(config, mesh_shape)
    losses = []
    for seed in range(2):
        state, metrics = step(state, random_batch(config, seed=seed))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sharded_training_matches_a_single_device(family):
    config = tiny_config(**(LLAMA_STYLE if family == "llama" else {}))
    ref_losses, ref_params = run_two_steps(config, (1, 1, 1))
    meshes = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
    if family == "gpt2":
        meshes.append((1, 1, 8))  # 8 heads, 8 KV heads: tensor=8 divides them
    for mesh_shape in meshes:
        losses, params = run_two_steps(config, mesh_shape)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=str(mesh_shape))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)
    assert ref_losses[1] < ref_losses[0] + 0.5  # the step trains, not just runs


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
    batch = random_batch(config, seed=3)
    _, state, step = setup(config, (2, 2, 2))
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


def test_tiny_config_is_valid():
    assert validate_config(tiny_config(), num_devices=8).num_layers == 2
