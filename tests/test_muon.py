"""optimizer.name=muon: which weights are matrices and how they are grouped, the update against
an independent numpy Newton-Schulz, one schedule for both parts, sharding, exact resume,
refusals."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import Transformer
from model.lora import LoraConfig, init_adapters
from tests.helpers import LLAMA_STYLE, random_batch, setup, tiny_config, train_until_killed
from tests.test_train_loop import checkpoint_steps, small_config
from training import loop, vectorized
from training.config import OptimizerConfig, validate_config
from training.optimizer import make_optimizer, muon_axes

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic


def numpy_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Muon's orthogonalisation of one matrix, written out in float64."""
    a, b, c = NS_COEFFS
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def expected_muon_update(g: np.ndarray, num_stack: int, num_in: int, rate: float) -> np.ndarray:
    """-rate * 0.2 * sqrt(max(in, out)) * NS(matrix) for each stacked (in x out) matrix."""
    ins, outs = g.shape[num_stack : num_stack + num_in], g.shape[num_stack + num_in :]
    fan_in, fan_out = int(np.prod(ins)), int(np.prod(outs))
    matrices = g.astype(np.float64).reshape(-1, fan_in, fan_out)
    ortho = np.stack([numpy_newton_schulz(m) for m in matrices])
    return -rate * 0.2 * np.sqrt(max(fan_in, fan_out)) * ortho.reshape(g.shape)


# name -> (shape, logical names, stacked axes, input axes); None: an AdamW weight.
WEIGHTS = {
    "w": ((8, 12), ("embed", "mlp"), 0, 1),
    "stacked": ((2, 12, 8), ("layers", "mlp", "embed"), 1, 1),
    "query": ((2, 8, 2, 4), ("layers", "embed", "heads", "head_dim"), 1, 1),
    "out": ((2, 2, 4, 8), ("layers", "heads", "head_dim", "embed"), 1, 2),
    "experts": ((2, 3, 8, 6), ("layers", "experts", "embed", "mlp"), 2, 1),
    "norm": ((8,), ("embed",), None, None),
    "token_embed": ((16, 8), ("vocab", "embed"), None, None),
    "lm_head": ((8, 16), ("embed", "vocab"), None, None),
}


def boxed_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: nn.Partitioned(jnp.asarray(rng.normal(size=shape), jnp.float32), names)
        for name, (shape, names, _, _) in WEIGHTS.items()
    }


def first_update(opt_config, step, seed=1):
    """The first update of make_optimizer(opt_config) at `step` on boxed_params' weights."""
    tx, schedule = make_optimizer(opt_config, num_steps=20)
    params = boxed_params()
    state = nn.meta.unbox(tx.init(params))  # as training/state.py makes it
    plain = nn.meta.unbox(params)
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), plain)
    updates, _ = tx.update(grads, state, plain, step=jnp.int32(step))
    return jax.device_get(updates), jax.device_get(grads), float(schedule(step))


MUON = dict(name="muon", grad_clip_norm=0.0, warmup_steps=10, learning_rate=0.02)


def test_kernels_get_newton_schulz_per_layer_matrix_and_the_rest_adamw():
    """At step 3 of a 10-step warmup both parts move at the schedule's rate, 0.3 x the peak."""
    config = OptimizerConfig(**MUON, muon_weight_decay=0.5)
    updates, grads, rate = first_update(config, step=3)
    assert rate == pytest.approx(0.3 * MUON["learning_rate"])
    params = nn.meta.unbox(boxed_params())
    for name, (_, _, num_stack, num_in) in WEIGHTS.items():
        if num_stack is not None:
            expected = expected_muon_update(grads[name], num_stack, num_in, rate)
            expected -= rate * 0.5 * np.asarray(params[name])  # decoupled, times the rate
            np.testing.assert_allclose(updates[name], expected, rtol=2e-4, atol=1e-6, err_msg=name)
    adamw, _, _ = first_update(OptimizerConfig(**{**MUON, "name": "adamw"}), step=3)
    for name in ("norm", "token_embed", "lm_head"):  # AdamW, the same rate and weight decay
        np.testing.assert_array_equal(updates[name], adamw[name], err_msg=name)


def test_every_model_weight_is_grouped_by_its_logical_axes():
    """The tiny models' kernels, LoRA adapters and low-rank factors: (stacked, in, out) axes."""
    expected = {
        ("layers", "embed", "heads", "head_dim"): ((1,), (2, 3)),
        ("layers", "embed", "kv_heads", "head_dim"): ((1,), (2, 3)),
        ("layers", "heads", "head_dim", "embed"): ((1, 2), (3,)),
        ("layers", "embed", "mlp"): ((1,), (2,)),
        ("layers", "mlp", "embed"): ((1,), (2,)),
        ("layers", "embed", "lora_rank"): ((1,), (2,)),
        ("layers", "lora_rank", "heads", "head_dim"): ((1,), (2, 3)),
        ("layers", "heads", "head_dim", "lora_rank"): ((1, 2), (3,)),
        ("layers", "lora_rank", "embed"): ((1,), (2,)),
        ("layers", "lora_rank", "mlp"): ((1,), (2,)),
        ("layers", "mlp", "lora_rank"): ((1,), (2,)),
        ("layers", "embed", "low_rank"): ((1,), (2,)),
        ("layers", "low_rank", "heads", "head_dim"): ((1,), (2, 3)),
        ("layers", "heads", "head_dim", "low_rank"): ((1, 2), (3,)),
        ("layers", "low_rank", "embed"): ((1,), (2,)),
    }
    seen = set()
    lora = LoraConfig(rank=2, targets="query,out,mlp")
    for overrides in ({}, LLAMA_STYLE, {"low_rank_ratio": 0.5, "low_rank_targets": "query,out"}):
        model = Transformer(validate_config(tiny_config(**overrides), 1, 1))

        def init():
            params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
            if overrides.get("low_rank_ratio"):
                return params
            return {"model": params, "lora": init_adapters(jax.random.key(1), params, lora)}

        for path, x in jax.tree_util.tree_leaves_with_path(
            jax.eval_shape(init), is_leaf=lambda x: isinstance(x, nn.Partitioned)
        ):
            if path[-1].key in ("kernel", "kernel_a", "kernel_b", "a", "b"):
                dims = muon_axes(x.names)
                assert (tuple(dims.reduction_axis), tuple(dims.output_axis)) == expected[x.names]
                seen.add(x.names)
    assert seen == set(expected)
    assert muon_axes(("layers", "embed")) is None and muon_axes(("embed",)) is None


def sharded_run(mesh_shape, steps=2):
    config = tiny_config(**LLAMA_STYLE)
    config.optimizer.name = "muon"
    _, state, train_step = setup(config, mesh_shape)
    for i in range(steps):
        state, _ = train_step(state, random_batch(config, seed=i))
    return state


def test_sharded_over_fsdp_equals_one_device():
    sharded, single = sharded_run((1, 8, 1)), sharded_run((1, 1, 1))
    muon = sharded.opt_state[1].inner_states["muon"].inner_state[0]
    momentum = muon.mu["layers"]["attn"]["query"]["kernel"]
    assert "fsdp" in str(momentum.sharding.spec)  # sharded like the kernel
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
        jax.device_get(sharded.params),
        jax.device_get(single.params),
    )


def test_resume_after_a_kill_gives_the_same_losses(tmp_path, monkeypatch):
    """Killed before step 8, after logging steps 1-6; resumed from checkpoint 4, steps 5 and 6
    are computed again, bitwise the same (step 6's loss depends on Muon's momentum)."""
    config = small_config(
        **{"train.num_steps": 8, "checkpoint.every_steps": 4, "train.eval_every": 0},
        **{"optimizer.name": "muon", "model.num_layers": 1},
    )
    workdir = str(tmp_path)
    train_until_killed(config, workdir, 8, monkeypatch)
    assert checkpoint_steps(workdir) == [4]
    loop.train(config, workdir)
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if "loss" in record:
                records.setdefault(record["step"], []).append(record["loss"])
    assert sorted(records) == list(range(1, 9))
    for step in (5, 6):
        before, after = records[step]
        assert before == after, step


def test_refusals():
    with pytest.raises(UserError, match="optimizer.name"):
        OptimizerConfig(name="sgd")
    with pytest.raises(UserError, match="optimizer.muon_ns_steps"):
        OptimizerConfig(name="muon", muon_ns_steps=0)
    with pytest.raises(UserError, match="optimizer.muon_beta"):
        OptimizerConfig(name="muon", muon_beta=1.0)
    with pytest.raises(UserError, match=r"no rule splits a weight with axes"):
        muon_axes(("layers", "embed", "mlp", "vocab"))
    config = tiny_config()
    config.optimizer.name = "muon"
    with pytest.raises(UserError, match="optimizer.name=muon is not supported"):
        vectorized.run(config, "/nonexistent", {"a": {"optimizer.learning_rate": 1e-3}})
