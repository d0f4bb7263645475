"""Low-rank factorization: exact at full rank, the model's shapes, both optimality theorems,
parameter count, the factorized model trains, errors."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from compression.calibrate import input_statistics
from compression.low_rank import factorize
from model.flops import count_params, matmul_params
from errors import UserError
from model import ModelConfig, Transformer
from tests.helpers import LLAMA_STYLE, TINY_MODEL, random_batch, setup, tiny_config

FAMILIES = {"gpt2": {}, "llama": LLAMA_STYLE}


def model_config(family) -> ModelConfig:
    # A wide init, so the logits and every kernel's spectrum are far from trivial.
    return ModelConfig(**TINY_MODEL, **FAMILIES[family], init_std=0.2)


def init(config: ModelConfig, seed=0):
    tokens = np.zeros((1, config.max_seq_len), np.int32)
    return nn.meta.unbox(Transformer(config).init(jax.random.key(seed), tokens)["params"])


def logits(config: ModelConfig, params, batch):
    args = batch["inputs"], batch["segment_ids"], batch["positions"]
    return np.asarray(Transformer(config).apply({"params": params}, *args))


@functools.cache
def dense_model(family):
    """(config, params, Gram matrices of every kernel's inputs on two calibration batches)."""
    config = model_config(family)
    params = init(config)
    calibration = [random_batch(tiny_config(), seed=seed) for seed in (1, 2)]
    return config, params, input_statistics(config, params, calibration, gram=True)


@pytest.mark.parametrize("method", ["svd", "whitened"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_reproduces_the_model_in_the_shapes_it_declares(family, method):
    config, params, grams = dense_model(family)
    new_params, new_config = factorize(params, config, ratio=1.0, method=method, grams=grams)
    declared = jax.eval_shape(lambda: init(new_config))
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(new_params) == shapes(declared)
    assert "kernel_a" in new_params["layers"]["mlp"]["wo"]  # factorized, not kept
    if config.use_bias:
        out, new_out = params["layers"]["attn"]["out"], new_params["layers"]["attn"]["out"]
        assert new_out["bias"] is out["bias"]
    batch = random_batch(tiny_config(), seed=3)
    dense, factored = logits(config, params, batch), logits(new_config, new_params, batch)
    assert np.abs(dense).max() > 1.0
    np.testing.assert_allclose(factored, dense, rtol=0, atol=1e-4 * np.abs(dense).max())


def test_only_the_targets_are_factorized():
    config = model_config("llama")
    params = init(config)
    new_params, new_config = factorize(params, config, ratio=0.5, targets="out,mlp")
    assert (new_config.low_rank_ratio, new_config.low_rank_targets) == (0.5, "out,mlp")
    declared = jax.eval_shape(lambda: init(new_config))
    assert jax.tree.map(np.shape, new_params) == jax.tree.map(np.shape, declared)
    attn, mlp = new_params["layers"]["attn"], new_params["layers"]["mlp"]
    assert attn["query"]["kernel"] is params["layers"]["attn"]["query"]["kernel"]
    assert [set(attn["out"]), set(mlp["wi_up"])] == [{"kernel_a", "kernel_b"}] * 2
    assert attn["out"]["kernel_a"].shape == (2, 8, 4, 16)  # [L, heads, head_dim, r = 32 / 2]


def _kernels(params, new_params):
    """(module, name, W [L, in, out], W' = A B [L, in, out]) of every factorized kernel."""
    for module, dense in new_params["layers"].items():
        for name, leaves in dense.items():
            if isinstance(leaves, dict) and "kernel_a" in leaves:
                a, b = (np.asarray(leaves[k], np.float64) for k in ("kernel_a", "kernel_b"))
                layers, rank = a.shape[0], a.shape[-1]
                a, b = a.reshape(layers, -1, rank), b.reshape(layers, rank, -1)
                w = np.asarray(params["layers"][module][name]["kernel"], np.float64)
                yield module, name, w.reshape(a.shape[0], a.shape[1], -1), a @ b


@pytest.mark.parametrize("family", FAMILIES)
def test_whitened_is_best_on_the_inputs_and_plain_is_best_on_the_weights(family):
    config, params, grams = dense_model(family)
    plain, _ = factorize(params, config, ratio=0.25, method="svd")
    whitened, _ = factorize(params, config, ratio=0.25, method="whitened", grams=grams)
    kernels = {(m, n): (w, w1) for m, n, w, w1 in _kernels(params, plain)}
    assert len(kernels) == (7 if family == "llama" else 6)
    for module, name, w, w_whitened in _kernels(params, whitened):
        w_plain = kernels[module, name][1]
        gram = np.asarray(grams["layers"][module][name]["gram"], np.float64)
        for layer, g in enumerate(gram):
            # ||X D||_F^2 = trace(D^T X^T X D) over every calibration input row of X.
            on_inputs = lambda d: np.sqrt(np.sum(d * (g @ d)))
            d_plain, d_whitened = w[layer] - w_plain[layer], w[layer] - w_whitened[layer]
            assert on_inputs(d_whitened) < on_inputs(d_plain), (module, name, layer)
            assert np.linalg.norm(d_plain) < np.linalg.norm(d_whitened), (module, name, layer)


def test_factorized_model_trains_and_counts_its_parameters():
    config = tiny_config(**LLAMA_STYLE, low_rank_ratio=0.5)
    config.optimizer.update(warmup_steps=0, weight_decay=0.0)  # the factors move by gradients only
    model, state, train_step = setup(config, (1, 1, 1))
    initial = jax.device_get(state.params)
    batch, losses = random_batch(config, seed=0), []
    for _ in range(4):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = jax.device_get(state.params)
    for module, name in (("attn", "out"), ("mlp", "wi_gate")):
        for factor in ("kernel_a", "kernel_b"):
            before = initial["layers"][module][name][factor]
            assert np.any(trained["layers"][module][name][factor] != before), (name, factor)

    # The parameter count: each [in, out] kernel of L layers now holds L x r x (in + out).
    dense_config = dataclasses.replace(model.config, low_rank_ratio=0.0)
    dense = init(dense_config)
    factored, factored_config = factorize(dense, dense_config, ratio=0.5)
    e, q, kv, m = 32, 32, 16, 64  # embed, query/out heads x head_dim, GQA key/value, mlp
    shapes = [(e, q), (e, kv), (e, kv), (q, e), (e, m), (e, m), (m, e)]
    saved = sum(i * o - math.ceil(0.5 * min(i, o)) * (i + o) for i, o in shapes)
    assert count_params(factored) == count_params(dense) - 2 * saved
    assert count_params(factored) == count_params(initial)
    # MFU counts the factors' matmuls, which are fewer by as many weights.
    dense_matmuls = matmul_params(dense_config, dense)
    assert matmul_params(factored_config, factored) == dense_matmuls - 2 * saved


def test_errors():
    config = model_config("gpt2")
    params = init(config)
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match="--rank_ratio"):
            factorize(params, config, ratio=ratio)
    with pytest.raises(UserError, match="--low_rank='qr'"):
        factorize(params, config, ratio=0.5, method="qr")
    with pytest.raises(UserError, match="--low_rank=whitened needs calibration"):
        factorize(params, config, ratio=0.5, method="whitened")
    with pytest.raises(UserError, match="model.low_rank_targets"):
        factorize(params, config, ratio=0.5, targets="query,lm_head")
    factored, factored_config = factorize(params, config, ratio=0.5)
    with pytest.raises(UserError, match="already factorized"):
        factorize(factored, factored_config, ratio=0.5)
    quantized = dataclasses.replace(config, quantization="int8")
    with pytest.raises(UserError, match="quantized"):
        factorize(params, quantized, ratio=0.5)
