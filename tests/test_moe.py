"""Mixture of experts (model/moe.py): dispatch against a loop over tokens and experts, the
capacity rule, the load-balancing loss on any layout, a train.py run and its refusals."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import moe, moe_dispatch
from model.config import ModelConfig
from model.flops import matmul_params
from model.transformer import Transformer
from tests.helpers import random_batch, tiny_config, train_until_killed
from tests.test_decode import _cached_logits as cached_logits
from tests.test_train_loop import checkpoint_steps, small_config
from sharding.mesh import make_mesh
from sharding.rules import activate, logical_rules
from training import loop
from training.config import validate_config
from training.trainer import Trainer

MOE = dict(
    mlp_activation="swiglu", use_bias=False, num_experts=4, experts_per_token=2, moe_mlp_dim=16
)
CONFIG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=16, max_seq_len=16,
    dtype="float32", num_shared_experts=1, **MOE,
)


def reference(params, x, k, renormalize, keep=None, xp=np):
    """The MoE layer token by token, expert by expert: x [N, D] -> [N, D]. `keep(n, j)`
    says whether token n's j-th choice is computed (capacity mode)."""
    silu = lambda a: a / (1 + xp.exp(-a))
    mlp = lambda h, g, u, o: (silu(h @ g) * (h @ u)) @ o
    logits = x @ params["router"]["kernel"]
    rows = []
    for n in range(x.shape[0]):
        probs = xp.exp(logits[n] - logits[n].max())
        probs = probs / probs.sum()
        chosen = np.argsort(-np.asarray(jax.lax.stop_gradient(probs)), kind="stable")[:k]
        total = sum(probs[e] for e in chosen) if renormalize else 1.0
        row = 0.0
        for j, e in enumerate(chosen):
            if keep is None or keep(n, j):
                w = [params[name]["kernel"][e] for name in ("wi_gate", "wi_up", "wo")]
                row = row + probs[e] / total * mlp(x[n], *w)
        shared = params["shared"]
        row = row + mlp(x[n], *(shared[name]["kernel"] for name in ("wi_gate", "wi_up", "wo")))
        rows.append(row)
    return xp.stack(rows)


def layer(config=CONFIG, seed=0, tokens=10, rows=1):
    module = moe.MoeMlp(config)
    x = jax.random.normal(jax.random.key(seed), (rows, tokens, config.embed_dim))
    params = nn.meta.unbox(module.init(jax.random.key(seed + 1), x)["params"])
    return module, jax.tree.map(np.asarray, params), x


@pytest.mark.parametrize("router_norm", ["softmax_topk_renorm", "softmax_topk"])
def test_dropless_equals_a_loop_over_tokens_and_experts(router_norm):
    config = dataclasses.replace(CONFIG, router_norm=router_norm)
    module, params, x = layer(config, tokens=6)
    renorm = router_norm == "softmax_topk_renorm"
    expected = reference(params, np.asarray(x[0], np.float64), 2, renorm)
    np.testing.assert_allclose(module.apply({"params": params}, x)[0], expected, atol=1e-5)

    cotangent = jax.random.normal(jax.random.key(7), x[0].shape)
    ours = lambda p, x: jnp.sum(module.apply({"params": p}, x)[0] * cotangent)
    loop = lambda p, x: jnp.sum(reference(p, x[0], 2, renorm, xp=jnp) * cotangent)
    got, want = jax.grad(ours, (0, 1))(params, x), jax.grad(loop, (0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def documented_keep(chosen, slots, num_experts=4):
    """The documented rule: an expert takes a shard's assignments in order of position, then
    of the token's k choices, up to its slots. chosen [N, k] -> kept {(n, j): bool}."""
    taken, kept = np.zeros(num_experts, int), {}
    for n, choices in enumerate(chosen):
        for j, e in enumerate(choices):
            kept[n, j] = taken[e] < slots
            taken[e] += 1
    return kept


def on_mesh(shape, fn, *args):
    """`fn(*args)` compiled under a mesh of `shape` (None: no mesh) -> (result, HLO text)."""
    if shape is None:
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled(*args), compiled.as_text()
    config = tiny_config()
    config.mesh.update(shape)
    mesh = make_mesh(config.mesh, jax.devices()[: int(np.prod(list(shape.values())))])
    with activate(mesh, logical_rules()):
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled(*args), compiled.as_text()


@pytest.mark.parametrize("mesh", [None, dict(data=2, expert=4)])
def test_capacity_drops_exactly_the_assignments_past_each_experts_slots(mesh):
    """Slots and queues are per batch shard: the whole batch without a mesh, each row on
    8 devices; past its slots an assignment is dropped (weight 0, the residual carries)."""
    small = dataclasses.replace(CONFIG, moe_dispatch="capacity", capacity_factor=0.5)
    module, params, x = layer(small, tokens=6, rows=8)
    shard_rows = 8 if mesh is None else 1
    slots = moe_dispatch.capacity(6 * shard_rows, 2, 4, 0.5)
    assert slots == (12 if mesh is None else 2)
    logits = np.asarray(x) @ params["router"]["kernel"]  # [rows, tokens, E]
    chosen = np.argsort(-logits, axis=-1, kind="stable")[..., :2].reshape(-1, shard_rows * 6, 2)
    kept = [documented_keep(shard, slots) for shard in chosen]  # per shard
    assert not all(all(k.values()) for k in kept)
    apply = lambda p, x: moe.MoeMlp(small).apply({"params": p}, x, mutable=[moe.STATS])
    (out, stats), _ = on_mesh(mesh, apply, params, x)
    tokens = np.asarray(x, np.float64).reshape(len(kept), -1, x.shape[-1])
    for shard, keep in enumerate(kept):
        expected = reference(params, tokens[shard], 2, True, lambda n, j: keep[n, j])
        np.testing.assert_allclose(out.reshape(tokens.shape)[shard], expected, atol=1e-5)
    dropped = sum(not v for keep in kept for v in keep.values())
    assert stats[moe.STATS]["dropped"] == dropped


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sharded_dispatch_equals_unsharded_forward_and_gradients(dispatch):
    """Per-shard dispatch with tokens exchanged between expert shards (all-to-all) and the
    expert width split over tensor gives the one-device values and gradients (capacity:
    with a factor large enough that nothing drops)."""
    config = dataclasses.replace(CONFIG, moe_dispatch=dispatch, capacity_factor=100.0)
    module, params, x = layer(config, tokens=4, rows=8)
    cotangent = jax.random.normal(jax.random.key(7), x.shape)
    loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) * cotangent)
    step = jax.value_and_grad(loss, (0, 1))
    want, hlo = on_mesh(None, step, params, x)
    assert "all-to-all" not in hlo
    for mesh in (dict(data=2, expert=4), dict(data=1, fsdp=2, expert=2, tensor=2)):
        got, hlo = on_mesh(mesh, step, params, x)
        assert "all-to-all" in hlo, mesh
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def router_inputs(model, params, batch):
    """The MoE layers' inputs (the mlp_norm outputs), [layers, N, embed]."""
    _, captured = model.apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        capture_intermediates=lambda module, _: module.name == "mlp_norm",
        mutable=["intermediates"],
    )
    (h,) = captured["intermediates"]["layers"]["mlp_norm"]["__call__"]
    return np.asarray(h, np.float64).reshape(h.shape[0], -1, h.shape[-1])


def numpy_losses(model, params, batch, k=2):
    """Switch load balance and router z over the global batch, mean over layers, in numpy."""
    mask = np.asarray(batch["segment_ids"]).reshape(-1) != 0
    balance, z = [], []
    routers = params["layers"]["moe"]["router"]["kernel"]
    for h, router in zip(router_inputs(model, params, batch), routers):
        logits = (h @ np.asarray(router, np.float64))[mask]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.argsort(-probs, axis=-1)[:, :k]
        share = np.bincount(chosen.reshape(-1), minlength=probs.shape[1]) / chosen.size
        balance.append(probs.shape[1] * np.sum(share * probs.mean(0)))
        z.append(np.mean(np.log(np.exp(logits).sum(-1)) ** 2))
    return np.mean(balance), np.mean(z)


def trainer_on(mesh, microbatches=1, **model):
    config = tiny_config(**{**MOE, **model})
    config.train.update(num_microbatches=microbatches, global_batch_size=8)
    config.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), mesh)))
    return Trainer(config, devices=jax.devices()[: int(np.prod(mesh))])


def two_steps(trainer):
    state, metrics = trainer.init_state(), []
    for seed in range(2):
        state, m = trainer.train_step(state, random_batch(trainer.config, seed=seed))
        metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics


def test_load_balance_loss_is_the_global_batch_formula_on_any_layout():
    single = trainer_on((1, 1, 1, 1))
    params = jax.device_get(single.init_state().params)
    balance, z = numpy_losses(single.model, params, random_batch(single.config, seed=0))
    _, base = two_steps(single)  # whose first step sees that batch with those params
    np.testing.assert_allclose(base[0]["moe_load_balance"], balance, rtol=1e-5)
    np.testing.assert_allclose(base[0]["moe_router_z"], z, rtol=1e-5)
    expert = trainer_on((2, 1, 4, 1))
    with activate(expert.mesh, expert.rules):  # tokens go to their experts' devices
        step = expert.train_step.jitted.lower(expert.abstract_state, expert.abstract_batch())
    assert "all_to_all" in step.as_text()
    for layout in (expert, trainer_on((1, 1, 1, 1), microbatches=4)):
        _, runs = two_steps(layout)
        for name in ("moe_load_balance", "moe_router_z", "moe_load_min", "moe_load_max"):
            np.testing.assert_allclose(runs[0][name], base[0][name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(runs[1]["loss"], base[1]["loss"], rtol=1e-4)


def test_every_second_layer_moe_scans_groups_and_decodes_with_a_cache():
    config = dataclasses.replace(CONFIG, num_layers=4, moe_every=2, num_shared_experts=0)
    model, tokens = Transformer(config), jnp.arange(12).reshape(2, 6) % 64
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    assert params["layers"]["block_0"]["mlp"]["wo"]["kernel"].shape == (2, 16, 8)
    assert params["layers"]["block_1"]["moe"]["wo"]["kernel"].shape == (2, 4, 16, 8)
    prompts, extra = [[5, 9, 2, 7, 11], [12, 13]], np.array([[21, 22], [31, 32]], np.int32)
    prefill, stepped, _ = cached_logits(model, params, prompts, extra)  # left-padded
    for row, prompt in enumerate(prompts):
        full = model.apply({"params": params}, np.array([prompt + extra[row].tolist()]))[0]
        ours = np.concatenate([prefill[row, prefill.shape[1] - len(prompt) :], stepped[row]])
        np.testing.assert_allclose(ours, full, atol=1e-4, rtol=1e-4)


def test_mfu_counts_the_active_experts_only():
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(CONFIG).init(jax.random.key(0), tokens)["params"])
    experts = sum(params["layers"]["moe"][n]["kernel"].size for n in ("wi_gate", "wi_up", "wo"))
    everything = matmul_params(dataclasses.replace(CONFIG, experts_per_token=4), params)
    assert matmul_params(CONFIG, params) == everything - experts // 2  # 2 of 4 experts


def test_train_py_logs_the_moe_metrics_and_resumes_exactly(tmp_path, monkeypatch):
    config = small_config(
        **{f"model.{k}": v for k, v in MOE.items()},
        **{"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0},
        **{"mesh.expert": 4, "mesh.data": 2},
    )
    workdir = str(tmp_path)
    train_until_killed(config, workdir, 6, monkeypatch)
    assert checkpoint_steps(workdir) == [3]
    loop.train(config, workdir)
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if "loss" in record:
                records.setdefault(record["step"], []).append(record)
    assert sorted(records) == list(range(1, 7))
    repeated = [step for step, logged in records.items() if len(logged) == 2]
    assert repeated  # logged before the kill and again after resuming from step 3
    for step in repeated:
        before, after = records[step]
        assert before["loss"] == after["loss"], step
    last = records[6][-1]
    assert {"moe_load_balance", "moe_router_z", "moe_dropped"} <= set(last)
    assert 0 < last["moe_load_min"] <= 0.25 <= last["moe_load_max"] < 1
    assert last["loss"] < records[1][0]["loss"]


@pytest.mark.parametrize(
    "model, mesh, lora, message",
    [
        (dict(experts_per_token=5), {}, {}, "model.experts_per_token=5: top-k cannot exceed"),
        (dict(num_experts=0), {}, {}, "model.num_experts=0: set it .* model.moe_mlp_dim"),
        (dict(capacity_factor=0.0), {}, {}, "model.capacity_factor"),
        (dict(mlp_activation="gelu"), {}, {}, "model.mlp_activation='gelu': MoE experts"),
        ({}, dict(expert=8, data=1), {}, "mesh.expert=8 does not divide model.num_experts=4"),
        ({}, {}, dict(rank=4, targets="query,mlp"), "experts of an MoE model are not adaptable"),
    ],
)
def test_refusals_name_the_field(model, mesh, lora, message):
    config = tiny_config(**{**MOE, **model})
    config.mesh.update(mesh)
    config.lora.update(lora)
    with pytest.raises(UserError, match=message):
        validate_config(config, 8)
