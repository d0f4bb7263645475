"""Pruning (compression/prune.py): exact N:M and unstructured masks over the kernels' input
axes, Wanda's scores against a numpy forward pass, and the requests it refuses."""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from compression.calibrate import input_statistics
from compression.prune import prune
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from tests.helpers import LLAMA_STYLE, TINY_MODEL

# Input axes (after the layers axis) of every layers' kernel.
NUM_IN = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_gate": 1, "wi_up": 1, "wo": 1}


def init_params(model_config, seed=0):
    """Random params of the model's shapes (no compile: jax.eval_shape), nothing exactly zero."""
    tokens = np.zeros((1, 8), np.int32)
    shapes = jax.eval_shape(lambda: Transformer(model_config).init(jax.random.key(0), tokens))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
        nn.meta.unbox(shapes["params"]),
    )


def kernels(params):
    """{"layers/<module>/<name>/kernel": kernel as [layers, out, in]}: output channels' inputs."""
    found = {}
    for module, children in params["layers"].items():
        for name, leaves in children.items():
            if isinstance(leaves, dict) and "kernel" in leaves:
                w = np.asarray(leaves["kernel"])
                in_size = math.prod(w.shape[1 : 1 + NUM_IN[name]])
                as_matrix = w.reshape(len(w), in_size, -1)
                found[f"layers/{module}/{name}/kernel"] = as_matrix.swapaxes(1, 2)
    return found


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    """(model config, params): tied GPT-2 style, or untied Llama style (GQA, SwiGLU)."""
    config = ModelConfig(**TINY_MODEL, **(LLAMA_STYLE if request.param == "llama" else {}))
    return config, init_params(config)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_keeps_the_n_largest_of_every_m_inputs(model, n, m):
    config, params = model
    pruned, report = prune(params, config, method="magnitude", n_m=(n, m), include_embeddings=True)
    before, after = kernels(params), kernels(pruned)
    # As kernels [1, out = vocab, in = embed]: the output head's inputs are the embedding.
    before["token_embed"], after["token_embed"] = (p["token_embed"][None] for p in (params, pruned))
    if "lm_head" in params:
        before["lm_head"], after["lm_head"] = (p["lm_head"].T[None] for p in (params, pruned))
    assert "layers/attn/out/kernel" in after and len(after) == len(report) - 2
    for path, w in after.items():
        groups, original = (x.reshape(*w.shape[:2], -1, m) for x in (w, before[path]))
        assert (np.count_nonzero(groups, axis=-1) == n).all(), path
        kept = groups != 0
        np.testing.assert_array_equal(groups[kept], original[kept])  # kept weights unchanged
        lowest_kept = np.where(kept, np.abs(original), np.inf).min(-1)
        assert (lowest_kept >= np.where(kept, 0, np.abs(original)).max(-1)).all(), path
        assert report[path] == 1 - n / m
    for name in ("pos_embed", "final_norm"):  # never pruned
        jax.tree.map(np.testing.assert_array_equal, pruned.get(name), params.get(name))
    unpruned, _ = prune(params, config, method="magnitude", n_m=(n, m))
    np.testing.assert_array_equal(unpruned["token_embed"], params["token_embed"])


def test_unstructured_sparsity_is_exact_per_matrix_and_per_output(model):
    config, params = model
    rng = np.random.default_rng(0)  # any positive input norms: their use is tested below
    stats = {
        "layers": {
            module: {
                name: {"sum_squares": rng.uniform(0.5, 2, d["kernel"].shape[: 1 + NUM_IN[name]])}
                for name, d in params["layers"][module].items()
            }
            for module in ("attn", "mlp")
        }
    }
    magnitude, report = prune(params, config, method="magnitude", sparsity=0.3)
    before = kernels(params)
    for path, w in kernels(magnitude).items():
        layers, out_size, in_size = w.shape
        zeros = np.count_nonzero(w.reshape(layers, -1) == 0, axis=-1)
        assert (zeros == math.floor(0.3 * out_size * in_size)).all(), path
        assert report[path] == zeros.sum() / w.size
        original, kept = np.abs(before[path]).reshape(layers, -1), w.reshape(layers, -1) != 0
        lowest_kept = np.where(kept, original, np.inf).min(-1)
        assert (lowest_kept >= np.where(kept, 0, original).max(-1)).all(), path

    # Ranks, not a threshold: weights all equal still lose exactly their share.
    equal = jax.tree.map(np.ones_like, params)
    _, report = prune(equal, config, method="magnitude", sparsity=0.3)
    assert all(report[p] == math.floor(0.3 * w[0].size) / w[0].size for p, w in before.items())
    _, report = prune(equal, config, method="magnitude", n_m=(2, 4))
    assert all(report[p] == 0.5 for p in before)

    wanda, _ = prune(params, config, method="wanda", sparsity=0.3, stats=stats)
    for path, w in kernels(wanda).items():
        zeros = np.count_nonzero(w == 0, axis=-1)  # per layer and output channel
        assert (zeros == math.floor(0.3 * w.shape[-1])).all(), path


def layer_norm(x, params, eps):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * params["scale"][0] + params["bias"][0]


def kernel_inputs(config, params, tokens):
    """Layer 0's kernel inputs, computed in numpy: {name: [tokens, *in]} of a 1-layer model."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    layer = p["layers"]
    dense = lambda x, name, spec: np.einsum(spec, x, layer["attn"][name]["kernel"][0]) + layer[
        "attn"
    ][name]["bias"][0]
    length = tokens.shape[1]
    x = p["token_embed"][tokens] + p["pos_embed"][:length]
    h = layer_norm(x, layer["attn_norm"], config.norm_eps)
    q, k, v = (dense(h, n, "bte,ehd->bthd") for n in ("query", "key", "value"))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(config.head_dim)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhts,bshd->bthd", probs, v)
    x = x + dense(attended, "out", "bthd,hde->bte")
    h2 = layer_norm(x, layer["mlp_norm"], config.norm_eps)
    pre = h2 @ layer["mlp"]["wi"]["kernel"][0] + layer["mlp"]["wi"]["bias"][0]
    gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    return {"query": flat(h), "out": flat(attended), "wi": flat(h2), "wo": flat(gelu)}


def test_wanda_mask_is_weight_times_input_norm():
    config = ModelConfig(**{**TINY_MODEL, "num_layers": 1})
    params = init_params(config, seed=3)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, config.max_seq_len))
    batch = {
        "inputs": tokens,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
    }
    stats = input_statistics(config, params, [batch])
    inputs = kernel_inputs(config, params, tokens)
    modules = {"query": "attn", "out": "attn", "wi": "mlp", "wo": "mlp"}
    for how in (dict(sparsity=0.5), dict(n_m=(2, 4))):
        pruned, _ = prune(params, config, method="wanda", stats=stats, **how)
        for name, x in inputs.items():
            w = np.asarray(params["layers"][modules[name]][name]["kernel"][0], np.float64)
            in_size = math.prod(x.shape[1:])
            norms = np.sqrt((x.reshape(len(x), in_size) ** 2).sum(0))  # ||X_i|| over the tokens
            scores = np.abs(w.reshape(in_size, -1)) * norms[:, None]  # [in, out]
            if "sparsity" in how:  # per output channel: the in_size // 2 lowest go
                expected = scores.argsort(0).argsort(0) >= in_size // 2
            else:  # per output channel and run of 4 consecutive inputs: the 2 highest stay
                groups = scores.reshape(in_size // 4, 4, -1)
                expected = (groups.argsort(1).argsort(1) >= 2).reshape(in_size, -1)
            got = pruned["layers"][modules[name]][name]["kernel"][0].reshape(in_size, -1)
            np.testing.assert_array_equal(np.asarray(got) != 0, expected, err_msg=f"{name} {how}")


def test_bad_requests_name_the_flag(model):
    config, params = model
    stats = {"layers": {}}

    def refused(match, model_config=config, **kwargs):
        with pytest.raises(UserError, match=match) as error:
            prune(params, model_config, **{"method": "magnitude", **kwargs})
        assert "\n" not in str(error.value)

    for sparsity in (0.0, 1.0, 1.5, -0.1):
        refused(rf"--sparsity={sparsity}: .*\(0, 1\)", sparsity=sparsity)
    for n_m in ((0, 4), (4, 4), (5, 4)):
        refused(rf"--n_m={n_m[0]}:{n_m[1]}: give N:M with 1 <= N < M", n_m=n_m)
    refused(r"--n_m=2:3: M=3 does not divide layers/attn/\w+/kernel's input size 32", n_m=(2, 3))
    refused("exactly one of --sparsity and --n_m")
    refused("exactly one of --sparsity and --n_m", sparsity=0.5, n_m=(2, 4))
    refused("--prune='random': give one of magnitude, wanda", method="random", sparsity=0.5)
    refused("--prune=wanda needs calibration data", method="wanda", sparsity=0.5)
    refused(
        "--prune=wanda has no calibration for the embeddings",
        method="wanda",
        sparsity=0.5,
        stats=stats,
        include_embeddings=True,
    )
    for changed in (dict(quantization="int8"), dict(low_rank_ratio=0.5)):
        refused(
            "prune the dense run first, then quantize",
            dataclasses.replace(config, **changed),
            sparsity=0.5,
        )
