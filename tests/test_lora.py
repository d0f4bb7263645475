"""LoRA: exact start, frozen base, adapter-only optimizer, merge, dropout, checkpoints, mesh,
errors."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from checkpoints.lora import BASE_DIR
from checkpoints.read import load_params
from errors import UserError
from model.hf import to_hf
from model.lora import merged_params, scaled
from tests.helpers import LLAMA_STYLE, random_batch, tiny_config
from tools import export_peft
from training import vectorized
from training.checkpoint import Checkpointer, Restored
from training.step import forward_sums
from training.trainer import Trainer

TARGETS = "query,key,value,out,mlp"  # every kind: 1 and 2 input axes, SwiGLU's 3 MLP kernels


def lora_config(model=None, **lora):
    config = tiny_config(**LLAMA_STYLE, **(model or {}))
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


def logits(trainer, params, adapters=None):
    """The model's logits on `params`, with `adapters` (scaled) beside the kernels if given."""
    tokens = random_batch(trainer.config, seed=1)["inputs"]
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    return np.asarray(trainer.model.apply(variables, tokens))


def save(trainer, state, workdir):
    """(config dict, model dict) after saving `state` as step 3 of `workdir`."""
    config_dict = json.loads(trainer.config.to_json_best_effort())
    model_dict = trainer.model_config.weight_fields()
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    checkpointer.save(3, state, {}, config_dict, model_dict)
    checkpointer.close()
    return config_dict, model_dict


def restore(trainer, workdir, config_dict, model_dict):
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    try:
        return checkpointer.restore_latest(trainer.abstract_state, config_dict, model_dict)
    finally:
        checkpointer.close()


def disk_bytes(directory) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


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
    # What training runs: the adapters beside the kernels, the same model.
    beside = logits(trainer, params["base"], scaled(params["lora"], trainer.lora))
    np.testing.assert_allclose(beside, logits(trainer, merged), atol=1e-5)


def test_dropout_changes_training_not_evaluation(run):
    trainer, initial, trained, ref_losses = run
    dropped = make_trainer(lora_config(dropout=0.5), (1, 1, 1))
    _, losses = train_steps(dropped, jax.device_put(initial, dropped.shardings), 3)
    assert losses[0] == ref_losses[0]  # B = 0: the dropped adapter path adds nothing yet
    assert losses[1] != ref_losses[1] and losses[2] < losses[0]  # other updates; it trains
    params = jax.device_get(trained.params)
    batch, adapters = random_batch(trainer.config, seed=1), scaled(params["lora"], trainer.lora)
    evaluate = lambda model: forward_sums(model, params["base"], batch, None, 0.0, adapters)
    assert evaluate(dropped.model) == evaluate(trainer.model)


def test_checkpoint_resumes_exactly_and_loads_merged(run, tmp_path):
    trainer, _, trained, _ = run
    config_dict, model_dict = save(trainer, trained, str(tmp_path))
    restored = restore(trainer, str(tmp_path), config_dict, model_dict)
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


def test_step_checkpoints_hold_adapters_not_the_base(tmp_path):
    # Wider than the tiny model, so that the base's bytes outweigh orbax's own files.
    trainer = make_trainer(lora_config(dict(embed_dim=128, mlp_dim=512)), (1, 1, 1))
    rng = np.random.default_rng(0)  # random values, as incompressible as trained weights
    state = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype), trainer.abstract_state
    )
    save(trainer, state, str(tmp_path))
    step_dir, base_dir = tmp_path / "checkpoints" / "3", tmp_path / BASE_DIR
    base_shapes = {x.shape for x in jax.tree.leaves(state.params["base"]) if x.ndim > 1}
    checkpointer = Checkpointer(str(tmp_path), keep=1, async_save=False)
    layout = checkpointer.manager.item_metadata(3)
    checkpointer.close()
    saved = jax.tree.leaves((layout["params"].tree, layout["opt_state"].tree))
    assert not base_shapes & {tuple(x.shape) for x in saved}
    assert disk_bytes(step_dir) < disk_bytes(base_dir) / 5


def test_missing_base_is_named(run, tmp_path):
    trainer, _, trained, _ = run
    config_dict, model_dict = save(trainer, trained, str(tmp_path))
    shutil.rmtree(tmp_path / BASE_DIR)
    message = f"the frozen base model they were trained on, {tmp_path / BASE_DIR}, is missing"
    with pytest.raises(UserError, match=message):
        restore(trainer, str(tmp_path), config_dict, model_dict)
    with pytest.raises(UserError, match=message):
        load_params(str(tmp_path), 3, trainer.abstract_model_params)


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


@pytest.fixture(scope="module")
def gpt2_run():
    """A GPT-2 style LoRA run 3 steps on: query and value share c_attn with the unadapted
    key, and attention's c_proj is left out while the MLP's c_proj is adapted."""
    config = tiny_config()
    config.optimizer.warmup_steps = 0
    config.lora.update(rank=4, alpha=8.0, targets="query,value,mlp")
    trainer = make_trainer(config, (1, 1, 1))
    trained, _ = train_steps(trainer, trainer.init_state(), 3)
    return trainer, trained


PEFT_MODULES = {
    "llama": {"self_attn." + m for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {"mlp." + m for m in ("gate_proj", "up_proj", "down_proj")},
    "gpt2": {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"},
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_the_exported_adapters_over_the_base(family, request, tmp_path):
    """tools/export_peft.py: peft's LoRA of the exported adapters, over the base model in
    transformers, gives meshlm's merged logits, with adapters on the adapted modules only."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    if family == "llama":
        trainer, _, trained, _ = request.getfixturevalue("run")
    else:
        trainer, trained = request.getfixturevalue("gpt2_run")
    workdir, out, base_dir = tmp_path / "run", str(tmp_path / "peft"), tmp_path / "base"
    save(trainer, trained, str(workdir))
    params = jax.device_get(trained.params)
    hf_config, tensors = to_hf(trainer.model_config, params["base"])
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps(hf_config))
    save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    export_peft.main([f"--workdir={workdir}", out, f"--base={base_dir}"])
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == str(base_dir)

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    tokens = torch.tensor(np.asarray(random_batch(trainer.config, seed=1)["inputs"]))
    with torch.no_grad():
        base_logits = base(tokens).logits.numpy()
        model = PeftModel.from_pretrained(base, out).eval()
        theirs = model(tokens).logits.numpy()
    adapted = {m.group(1) for n, _ in model.named_modules() if (m := LORA_A.search(n))}
    assert adapted == PEFT_MODULES[family]
    ours = logits(trainer, trainer.model_params(trained.params))
    np.testing.assert_allclose(base_logits, logits(trainer, params["base"]), atol=1e-4)
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


LORA_A = re.compile(r"\.\d+\.(.*)\.lora_A$")  # "...h.0.attn.c_attn.lora_A" -> "attn.c_attn"


def test_peft_export_of_a_whole_model_is_refused(tmp_path):
    full = make_trainer(tiny_config(**LLAMA_STYLE), (1, 1, 1))
    save(full, full.init_state(), str(tmp_path / "full"))
    message = "holds a whole model, not LoRA adapters .* tools/export_hf.py"
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        export_peft.main([f"--workdir={tmp_path / 'full'}", str(tmp_path / "out"), "--base=b"])
