"""LoRA: exact start, frozen base, adapter-only optimizer, merge, checkpoints, mesh, errors."""

import json

import jax
import numpy as np
import pytest

from errors import UserError
from model.lora import merged_params
from tests.helpers import LLAMA_STYLE, random_batch, tiny_config
from training import vectorized
from training.checkpoint import Checkpointer, Restored, load_params
from training.trainer import Trainer

TARGETS = "query,key,value,out,mlp"  # every kind: 1 and 2 input axes, SwiGLU's 3 MLP kernels


def lora_config(**lora):
    config = tiny_config(**LLAMA_STYLE)
    config.optimizer.warmup_steps = 0  # every step moves the adapters
    config.lora.update(dict(rank=4, alpha=8.0, targets=TARGETS), **lora)
    return config


def make_trainer(config, mesh_shape):
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    return Trainer(config, devices=jax.devices()[: int(np.prod(mesh_shape))])


def train_steps(trainer, state, num_steps):
    batch, losses = random_batch(trainer.config, seed=0), []
    for _ in range(num_steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def logits(trainer, params):
    tokens = random_batch(trainer.config, seed=1)["inputs"]
    return np.asarray(trainer.model.apply({"params": params}, tokens))


@pytest.fixture(scope="module")
def run():
    """A LoRA trainer on one device, its initial state (host copy) and the state 3 steps on."""
    trainer = make_trainer(lora_config(), (1, 1, 1))
    initial = trainer.init_state()
    initial_host = jax.device_get(initial)
    trained, losses = train_steps(trainer, initial, 3)
    return trainer, initial_host, trained, losses


def test_step_zero_is_exactly_the_base_model(run):
    trainer, initial, _, _ = run
    merged = merged_params(initial.params["base"], initial.params["lora"], trainer.lora)
    np.testing.assert_array_equal(logits(trainer, merged), logits(trainer, initial.params["base"]))


def test_only_adapters_train_and_hold_optimizer_state(run):
    trainer, initial, trained, losses = run
    assert losses[2] < losses[0]  # the adapters learn
    trained = jax.device_get(trained)
    jax.tree.map(np.testing.assert_array_equal, trained.params["base"], initial.params["base"])
    b_kernels = [ab["b"] for m in trained.params["lora"]["layers"].values() for ab in m.values()]
    assert len(b_kernels) == 7 and all(np.any(b != 0) for b in b_kernels)
    # Adam's two moments of the adapters, nothing of the base.
    adapter_size = sum(x.size for x in jax.tree.leaves(trained.params["lora"]))
    opt_size = sum(x.size for x in jax.tree.leaves(trained.opt_state) if x.ndim)
    assert opt_size == 2 * adapter_size
    assert trainer.num_trainable_params == adapter_size < trainer.num_params / 5


def test_merged_weights_equal_base_plus_scaled_adapters(run):
    trainer, _, trained, _ = run
    params = jax.device_get(trained.params)
    expected = jax.tree.map(np.array, params["base"])
    for module, kernels in params["lora"]["layers"].items():
        for name, ab in kernels.items():
            kernel = expected["layers"][module][name]["kernel"]
            layers = kernel.shape[0]
            a = ab["a"].reshape(layers, -1, ab["a"].shape[-1])
            b = ab["b"].reshape(layers, ab["b"].shape[1], -1)
            kernel += (8.0 / 4) * (a @ b).reshape(kernel.shape)
    merged = trainer.model_params(trained.params)
    np.testing.assert_allclose(logits(trainer, merged), logits(trainer, expected), atol=1e-5)


def test_checkpoint_resumes_exactly_and_loads_merged(run, tmp_path):
    trainer, _, trained, _ = run
    config_dict = json.loads(trainer.config.to_json_best_effort())
    model_dict = trainer.model_config.weight_fields()
    checkpointer = Checkpointer(str(tmp_path), keep=1, async_save=False)
    checkpointer.save(3, trained, {}, config_dict, model_dict)
    restored = checkpointer.restore_latest(trainer.abstract_state, config_dict, model_dict)
    checkpointer.close()
    resumed = trainer.resumed_state(restored)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(trained))
    # What sampling, eval and export read: base and adapters merged.
    loaded = load_params(str(tmp_path), 3, trainer.abstract_model_params)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(loaded),
        jax.device_get(trainer.model_params(trained.params)),
    )
    # train.init_from gives base params alone: the adapters start fresh.
    fresh = trainer.resumed_state(Restored(0, loaded, None, None))
    assert not any(
        np.any(b["b"]) for m in fresh.params["lora"]["layers"].values() for b in m.values()
    )


def test_sharded_lora_matches_one_device(run):
    _, _, _, ref_losses = run
    trainer = make_trainer(lora_config(), (2, 2, 2))
    _, losses = train_steps(trainer, trainer.init_state(), 3)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)


@pytest.mark.parametrize(
    "lora, message",
    [
        (dict(targets="query,ffn"), "lora.targets='query,ffn': ['ffn'] names no kernel"),
        (dict(rank=33), "lora.rank=33 is larger than layers/attn/query/kernel"),
    ],
)
def test_bad_lora_config_is_named(lora, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_trainer(lora_config(**lora), (1, 1, 1))


def test_vectorized_sweeps_refuse_lora(tmp_path):
    with pytest.raises(UserError, match=r"--vectorized: LoRA \(lora.rank > 0\) is not supported"):
        vectorized.run(lora_config(), str(tmp_path), {"a": {"optimizer.learning_rate": 1e-3}})
