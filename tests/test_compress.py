"""compress.py: int8/int4 weights with the right scales, and compressed workdirs (quantized,
pruned, factorized) that eval.py, the sampler and Hugging Face export read like any other."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from checkpoints.layout import tree_differences
from checkpoints.read import load_run, load_sampler
from checkpoints.write import save_params
from compression.low_rank import factorize
from compression.quantize import dense_params, quantize_params
from evaluation.run import evaluate_workdir
from model import Transformer, quantize
from model.config import ModelConfig
from model.hf import param_shapes
from model.sampler import SamplingConfig, parse_mesh
from tests.helpers import LLAMA_STYLE, TINY_MODEL
from tests.test_hf_interop import WORDS, assert_exported_logits_match, save_hf
from tests.test_hf_parity import gpt2, random_model
from tools import export_hf, import_hf

ONE_DEVICE = parse_mesh("1,1,1")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(workdir, corpus): an imported GPT-2 (random O(0.1) weights, its word-level tokenizer
    inside the workdir) whose data config reads a small corpus of the tokenizer's words."""
    root = tmp_path_factory.mktemp("compress")
    hf_dir = save_hf(random_model(gpt2()), root / "hf")
    workdir, corpus = str(root / "source"), root / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text(" ".join(rng.choice(WORDS[1:], 3000)))
    import_hf.import_hf(hf_dir, workdir, "float32", "float32")
    run = load_run(workdir, abstract=export_hf.on_host)
    config = run.config
    config.data.update(
        source="files", train_files=str(corpus), eval_files=str(corpus), pipeline="stream",
        seq_len=16, eval_max_batches=2,
    )
    config.train.global_batch_size = 4
    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # the step, rewritten
    save_params(workdir, run.params, json.loads(config.to_json_best_effort()),
                run.model_config.weight_fields())
    return workdir, str(corpus)


@functools.cache
def random_params(config: ModelConfig):
    init = jax.jit(Transformer(config).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return nn.meta.unbox(init["params"])


def logits(config: ModelConfig, params, tokens):
    return jax.jit(Transformer(config).apply)({"params": params}, tokens)


def layer_kernels(params):
    """{path: kernel} of every layers' kernel."""
    return {f"{module}/{name}": leaves["kernel"] for module, children in params["layers"].items()
            for name, leaves in children.items() if isinstance(leaves, dict) and "kernel" in leaves}


@pytest.mark.parametrize("method, group", [("int8", 128), ("int4", 16)])
def test_quantized_weights_are_within_half_a_step_with_a_scale_per_layer_and_channel(
    method, group
):
    config = ModelConfig(**TINY_MODEL, **LLAMA_STYLE)  # attn out has two input axes
    params = random_params(config)
    quantized_config = dataclasses.replace(config, quantization=method, quant_group_size=group)
    quantized = quantize_params(params, quantized_config)
    dense, plain = dense_params(quantized, quantized_config)
    assert plain == config
    for path, w in layer_kernels(params).items():
        module, name = path.split("/")
        leaves = quantized["layers"][module][name]
        q, scale = leaves["kernel"], leaves["kernel_scale"]
        num_in = 2 if name == "out" else 1
        in_size, out = int(np.prod(w.shape[1 : 1 + num_in])), w.shape[1 + num_in :]
        groups = 1 if method == "int8" else in_size // group
        assert q.dtype == quantize.DTYPES[method]
        expected = (w.shape[0], *out) if method == "int8" else (w.shape[0], groups, *out)
        assert scale.shape == expected
        # one scale per layer, group and output channel: the absmax of its weights / max_int
        per_group = np.abs(np.asarray(w)).reshape(w.shape[0], groups, -1, *out).max(axis=2)
        np.testing.assert_allclose(scale.reshape(per_group.shape),
                                   per_group / quantize.max_int(method), rtol=1e-6)
        step = np.repeat(np.asarray(scale).reshape(per_group.shape), in_size // groups, axis=1)
        error = np.abs(np.asarray(dense["layers"][module][name]["kernel"]) - np.asarray(w))
        assert np.all(error <= step.reshape(w.shape) / 2 * (1 + 1e-6)), path
        # dense_params is exactly the integers times their scales
        np.testing.assert_array_equal(
            dense["layers"][module][name]["kernel"],
            np.asarray(q, np.float32) * step.reshape(w.shape),
        )


@pytest.mark.parametrize(
    "style, compression",
    [
        ({}, dict(quantization="int8")),
        ({}, dict(quantization="int4", quant_group_size=16, quantize_embeddings=True)),
        (LLAMA_STYLE, dict(quantization="int8", quantize_embeddings=True)),  # untied lm_head
        (LLAMA_STYLE, dict(quantization="int8", low_rank_ratio=0.5)),  # kernel_a, kernel_b
    ],
)
def test_quantized_params_are_the_tree_the_model_declares(style, compression):
    config = ModelConfig(**TINY_MODEL, **style)
    params = random_params(config)
    if compression.get("low_rank_ratio"):
        params, _ = factorize(params, config, ratio=compression["low_rank_ratio"])
    target = dataclasses.replace(config, **compression)
    quantized = quantize_params(params, target)
    assert tree_differences(quantized, param_shapes(target)) == []
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(quantized)}
    assert all(v.dtype == quantize.DTYPES[target.quantization] for k, v in flat.items()
               if k.endswith("kernel']") or k.endswith("kernel_a']") or k.endswith("kernel_b']"))
    dense, plain = dense_params(quantized, target)
    assert tree_differences(dense, param_shapes(plain)) == []


def test_scales_and_factors_carry_their_kernels_logical_axes():
    """Scales are sharded like their kernel's output channels (the tied head's: vocab), so
    the sharding rules place them beside the integers they scale."""

    def names(**fields):
        config = ModelConfig(**{**TINY_MODEL, **fields})
        tokens = jnp.zeros((1, 1), jnp.int32)
        boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"]
        is_box = lambda x: isinstance(x, nn.Partitioned)
        return jax.tree.map(lambda box: box.names, boxed, is_leaf=is_box)

    int4 = names(quantization="int4", quant_group_size=16, quantize_embeddings=True,
                 tie_embeddings=False)
    attn = int4["layers"]["attn"]
    assert attn["query"]["kernel_scale"] == ("layers", "quant_groups", "heads", "head_dim")
    assert attn["out"]["kernel_scale"] == ("layers", "quant_groups", "embed")
    assert int4["token_embed_scale"] == int4["lm_head_scale"] == ("quant_groups", "vocab")
    int8 = names(quantization="int8", quantize_embeddings=True)
    assert int8["layers"]["mlp"]["wo"]["kernel_scale"] == ("layers", "embed")
    assert int8["token_embed_scale"] == ("vocab",)
    factors = names(low_rank_ratio=0.5)["layers"]["mlp"]["wi"]
    assert factors["kernel_a"] == ("layers", "embed", "low_rank")
    assert factors["kernel_b"] == ("layers", "low_rank", "mlp")


def test_the_token_embedding_has_one_scale_per_vocabulary_row():
    config = ModelConfig(**TINY_MODEL)
    params = random_params(config)
    target = dataclasses.replace(config, quantization="int8", quantize_embeddings=True)
    quantized = quantize_params(params, target)
    scale = np.asarray(quantized["token_embed_scale"])
    table = np.asarray(params["token_embed"], np.float32)
    assert scale.shape == (config.vocab_size,)
    np.testing.assert_allclose(scale, np.abs(table).max(axis=1) / 127, rtol=1e-6)
    error = np.abs(np.asarray(quantized["token_embed"], np.float32) * scale[:, None] - table)
    assert np.all(error <= scale[:, None] / 2 + 1e-7)


@pytest.mark.parametrize("method, group, bound", [("int8", 128, 0.005), ("int4", 16, 0.06)])
def test_quantized_logits_are_close_to_the_float_logits(method, group, bound):
    config = ModelConfig(**TINY_MODEL)
    params = random_params(config)
    target = dataclasses.replace(config, quantization=method, quant_group_size=group)
    quantized = quantize_params(params, target)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.max_seq_len))
    ours, full = logits(target, quantized, tokens), logits(config, params, tokens)
    relative = float(jnp.linalg.norm(ours - full) / jnp.linalg.norm(full))
    assert 0 < relative < bound
    dense, plain = dense_params(quantized, target)  # the same model, in float kernels
    np.testing.assert_allclose(logits(plain, dense, tokens), ours, atol=1e-5)


COMPRESSIONS = {
    "int8": ["--quantize=int8"],
    "int4_g32": ["--quantize=int4", "--group_size=32", "--quantize_embeddings"],
    "wanda_2_4": ["--prune=wanda", "--n_m=2:4", "--calibration_batches=2"],
    "whitened_svd": [  # calibrated on other text than the run's training data
        "--low_rank=whitened", "--rank_ratio=0.5", "--calibration_text_files={corpus}",
        "--calibration_batches=2",
    ],
    "magnitude_then_int8": ["--prune=magnitude", "--sparsity=0.5", "--quantize=int8"],
}


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_a_compressed_workdir_evaluates_samples_and_exports(tmp_path, source, capsys, name):
    workdir, corpus = source
    output, hf_dir = str(tmp_path / name), str(tmp_path / "hf")
    flags = [f.format(corpus=corpus) for f in COMPRESSIONS[name]]
    compress.main([f"--workdir={workdir}", f"--output={output}", *flags])
    printed = capsys.readouterr().out
    with open(os.path.join(output, "compression.json")) as f:
        record = json.load(f)
    assert record["source"]["workdir"] == workdir and "weight bytes" in printed
    sizes = record["weight_bytes"]
    if "int" in name:
        assert sizes["after"] < sizes["before"] / (5 if "int4" in name else 3)
    if "2_4" in name or "magnitude" in name:
        assert record["sparsity"]["layers/mlp/wi/kernel"] == 0.5
        assert "layers/mlp/wi/kernel" in printed
    if "svd" in name:
        assert record["params"]["after"] < record["params"]["before"]
    config = load_run(output).config
    assert config.data.tokenizer.startswith(output) and os.path.isfile(config.data.tokenizer)

    results = evaluate_workdir(output, mesh="1,1,1", devices=jax.devices()[:1], max_batches=1)
    assert np.isfinite(results["results"]["validation"]["loss"])

    sampler, _ = load_sampler(output, ONE_DEVICE, jax.devices()[:1])
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    generated = sampler.generate([[5, 9, 2], [7]], greedy, eos_id=-1)
    assert [len(g) for g in generated] == [6, 6]

    line = export_hf.export_hf(output, hf_dir, 2**30)
    quantized = [f.split("=")[1] for f in COMPRESSIONS[name] if f.startswith("--quantize=")]
    for method in quantized:
        assert f"dequantized from {method}" in line
    assert_exported_logits_match(output, hf_dir)  # the compressed model, computed by meshlm


def test_the_command_line_writes_a_quantized_workdir(tmp_path, source):
    workdir, _ = source
    output = str(tmp_path / "int8")
    command = [sys.executable, "compress.py", f"--workdir={workdir}", f"--output={output}",
               "--quantize=int8"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(quantize)" in done.stdout and "weight bytes" in done.stdout
    assert load_run(output).model_config.quantization == "int8"


BAD_REQUESTS = {
    "no checkpoint": (["--quantize=int8"], "nowhere", "has no checkpoint"),
    "sparsity": (["--prune=magnitude", "--sparsity=1.5"], None, r"--sparsity=1.5: .*\(0, 1\)"),
    "n:m": (["--prune=magnitude", "--n_m=2:3"], None, r"--n_m=2:3: M=3 does not divide"),
    "int4 group": (["--quantize=int4", "--group_size=48"], None, r"--quantize=int4: .*group"),
    "prune and low rank": (
        ["--prune=magnitude", "--sparsity=0.5", "--low_rank=svd"], None, "--prune with --low_rank"
    ),
    "rank ratio": (["--low_rank=svd", "--rank_ratio=1.5"], None, r"--rank_ratio=1.5"),
    "nothing asked": ([], None, "give at least one of"),
    "calibration files": (
        ["--prune=wanda", "--sparsity=0.5", "--calibration_text_files=/no/such/*.txt"], None,
        "--calibration_text_files",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_one_line_and_write_nothing(tmp_path, source, monkeypatch, case):
    flags, workdir, message = BAD_REQUESTS[case]
    workdir = str(tmp_path / workdir) if workdir else source[0]
    output = tmp_path / "out"

    def no_reading(*args, **kwargs):
        raise AssertionError("arrays read before the request was checked")

    monkeypatch.setattr(compress, "load_run", no_reading)
    with pytest.raises(SystemExit) as exit_info:
        compress.main([f"--workdir={workdir}", f"--output={output}", *flags])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text
    assert sorted(os.listdir(tmp_path)) == []


def test_an_output_that_holds_a_run_is_refused(tmp_path, source):
    workdir, _ = source
    with pytest.raises(SystemExit, match=r"error: --output=.* holds a run; .*new or empty"):
        compress.main([f"--workdir={workdir}", f"--output={workdir}", "--quantize=int8"])
    assert load_run(workdir).model_config.quantization == "none"


def test_a_failure_midway_leaves_no_workdir(tmp_path, source, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compress, "save_params", broken)
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        compress.main([f"--workdir={source[0]}", f"--output={output}", "--quantize=int8"])
    assert sorted(os.listdir(tmp_path)) == []
