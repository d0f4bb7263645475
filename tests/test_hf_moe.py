"""Hugging Face Mixtral and Qwen3-MoE (and dense Qwen3), both ways: logits (float32, 1e-4),
greedy decoding, the command-line round trip, and the MoE variants meshlm refuses.

Tiny random models are built here: every parameter random and O(0.1), routers included, so
that tokens spread over the experts and a mistake in any tensor or in the routing moves the
logits far past the tolerance.
"""

import functools
import json
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from configs import qwen3_30b_a3b
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model.flops import count_params, matmul_params
from model.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    hf_tensors,
    param_shapes,
    params_from_hf,
)
from model.sampler import Sampler
from tests.helpers import assert_greedy_matches_hf
from tests.test_hf_interop import assert_exported_logits_match, save_hf, tensors
from tools import export_hf, import_hf
from tools.export_hf import write_safetensors
from training.config import validate_config

VOCAB, POSITIONS, TOLERANCE = 101, 64, 1e-4
SHAPE = dict(
    vocab_size=VOCAB,
    max_position_embeddings=POSITIONS,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)


def mixtral(**kw):
    return MixtralConfig(**{**SHAPE, "intermediate_size": 32, "num_local_experts": 4, **kw})


def qwen3_moe(**kw):
    qwen = dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4)
    return Qwen3MoeConfig(**{**SHAPE, **qwen, "norm_topk_prob": True, **kw})


# Between them: GQA and MQA, untied and tied embeddings, the default and another RoPE base,
# the k weights renormalised (Mixtral) or not (norm_topk_prob=False), per-head q/k norms.
CASES = {
    "mixtral": mixtral(),
    "qwen3_moe": qwen3_moe(
        norm_topk_prob=False,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}
# Dense Qwen3 (q/k norms, no experts) is converted by the same tables.
QWEN3 = Qwen3Config(**{**SHAPE, "head_dim": 16, "intermediate_size": 96})
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 48))


@functools.cache
def hf_model(name):
    """A float32 HF model whose every parameter is random and O(0.1)."""
    torch.manual_seed(0)
    hf_config = QWEN3 if name == "qwen3" else CASES[name]
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model):
    with torch.no_grad():
        logits = model(torch.as_tensor(TOKENS)).logits.numpy()
    # Not degenerate: logits spread over tokens and change along the sequence.
    assert logits.std(axis=-1).mean() > 0.3
    assert np.abs(np.diff(logits, axis=1)).mean() > 0.1
    return logits


@functools.cache
def _forward(config):
    return jax.jit(lambda params, tokens: Transformer(config).apply({"params": params}, tokens))


def our_logits(config, params):
    return np.asarray(_forward(config)(params, TOKENS))


@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_match_hf(name):
    model = hf_model(name)
    config, params = from_hf(model, dtype="float32")  # transformers 5's fused experts
    assert (config.num_experts, config.experts_per_token, config.moe_mlp_dim) == (4, 2, 32)
    assert (config.qk_norm, config.router_norm) == {
        "mixtral": (False, "softmax_topk_renorm"),
        "qwen3_moe": (True, "softmax_topk"),
    }[name]
    assert np.abs(our_logits(config, params) - hf_logits(model)).max() < TOLERANCE


def test_dense_qwen3_logits_match_hf_both_ways():
    model = hf_model("qwen3")
    config, params = from_hf(model, dtype="float32")
    assert (config.qk_norm, config.num_experts) == (True, 0)
    assert np.abs(our_logits(config, params) - hf_logits(model)).max() < TOLERANCE
    assert config_to_hf(config)["architectures"] == ["Qwen3ForCausalLM"]
    params = random_params(config)
    model = AutoModelForCausalLM.from_config(QWEN3, dtype=torch.float32).eval()
    exported = {k: torch.as_tensor(v) for k, v in hf_tensors(params, config)}
    model.load_state_dict(exported)  # strict: every tensor, no other
    assert np.abs(our_logits(config, params) - hf_logits(model)).max() < TOLERANCE


@pytest.mark.parametrize("name", list(CASES))
def test_files_and_memory_layouts_give_the_same_params(tmp_path, name):
    """save_pretrained writes one tensor per expert (as the Hub's files); in memory
    transformers 5 fuses them: both read to the same params, and export writes the files'."""
    model = hf_model(name)
    model.save_pretrained(tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    config = config_from_hf(model.config)
    # config.json as tools/import_hf.py reads it (transformers 5 writes Qwen3-MoE's
    # num_experts as num_local_experts; the Hub's files say num_experts).
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(types.SimpleNamespace(**saved)) == config
    from_files, from_memory = (params_from_hf(d, config) for d in (files, model.state_dict()))
    jax.tree.map(np.testing.assert_array_equal, from_files, from_memory)
    exported = dict(hf_tensors(from_files, config))
    assert sorted(exported) == sorted(files)
    for key, array in files.items():
        np.testing.assert_array_equal(exported[key], array, err_msg=key)


def random_params(config, seed=1):
    """meshlm params with every entry random and O(0.1) (norm scales around 1)."""
    leaves, tree = jax.tree.flatten(param_shapes(config))
    rng = np.random.default_rng(seed)
    noise = [0.1 * rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
    params = jax.tree.unflatten(tree, noise)
    return jax.tree.map_with_path(
        lambda path, x: x + 1 if "norm" in jax.tree_util.keystr(path) else x, params
    )


@pytest.mark.parametrize("name", list(CASES))
def test_exported_model_gives_our_logits_in_transformers(tmp_path, name):
    config = config_from_hf(CASES[name], dtype="float32")
    params = random_params(config)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_to_hf(config), f)
    write_safetensors(hf_tensors(params, config), str(tmp_path), 2**30)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert type(model) is type(hf_model(name))
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert np.abs(our_logits(config, params) - hf_logits(model.eval())).max() < TOLERANCE


def test_cached_greedy_decoding_equals_transformers_generate():
    model = hf_model("qwen3_moe")
    config, params = from_hf(model, dtype="float32")
    mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sampler = Sampler(config, params, mesh, devices=jax.devices()[:1])
    prompts, eos = [[5, 9, 40, 7, 11], [12, 3], [33, 34, 35, 36, 37, 38, 39, 30]], 2
    assert_greedy_matches_hf(sampler, model, prompts, eos)


def test_router_norm_follows_norm_topk_prob():
    for norm_topk_prob, router_norm in [(True, "softmax_topk_renorm"), (False, "softmax_topk")]:
        config = config_from_hf(qwen3_moe(norm_topk_prob=norm_topk_prob))
        assert config.router_norm == router_norm
        assert config_to_hf(config)["norm_topk_prob"] is norm_topk_prob


@pytest.mark.parametrize(
    "hf_config, message",
    [
        (Qwen2MoeConfig(num_experts=4), r"qwen2_moe.* sigmoid gate \(shared_expert_gate\)"),
        (qwen3_moe(decoder_sparse_step=2), "decoder_sparse_step=2 is not supported"),
        (qwen3_moe(mlp_only_layers=[1]), r"mlp_only_layers=\[1\] is not supported"),
        (mixtral(router_jitter_noise=0.1), "router_jitter_noise=0.1 is not supported"),
        (mixtral(sliding_window=16), "sliding_window=16 is not supported"),
    ],
)
def test_moe_variants_meshlm_does_not_compute_are_refused(hf_config, message):
    with pytest.raises(UserError, match=message):
        config_from_hf(hf_config)


def test_models_no_moe_family_expresses_are_refused():
    qwen = config_from_hf(CASES["qwen3_moe"])
    for change, message in [
        (dict(num_shared_experts=1), r"Qwen3MoeForCausalLM needs .*model.num_shared_experts=1\)"),
        (dict(qk_norm=False), r"MixtralForCausalLM needs .*model.router_norm='softmax_topk'\)"),
    ]:
        fields = {**qwen.weight_fields(), **change}
        with pytest.raises(UserError, match=message):
            config_to_hf(ModelConfig(**fields))


def test_the_moe_preset_is_qwen3_30b_a3b_shaped():
    config = qwen3_30b_a3b.get_config()
    model_config = validate_config(config, num_devices=64)
    hf = config_to_hf(model_config)
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (hf["num_experts"], hf["num_experts_per_tok"], hf["norm_topk_prob"]) == (128, 8, True)
    params = param_shapes(model_config)
    assert count_params(params) == 30_532_122_624  # Qwen3-30B-A3B: 30.5B, 3.3B active
    # Active: 3.04B in matmuls, + 0.31B of the embedding table and norms = 3.35B.
    assert matmul_params(model_config, params) == 3_041_656_832


def test_command_line_round_trip_is_bit_identical(tmp_path):
    """tools/import_hf.py then tools/export_hf.py: the per-expert files come back bit for bit
    and transformers loads them."""
    hf_dir = save_hf(hf_model("qwen3_moe"), tmp_path / "hf")
    workdir, out_dir = str(tmp_path / "workdir"), str(tmp_path / "out")
    import_hf.main([hf_dir, f"--workdir={workdir}"])
    export_hf.main([f"--workdir={workdir}", out_dir])
    original, exported = tensors(hf_dir), tensors(out_dir)
    assert sorted(original) == sorted(exported)
    for key, array in original.items():
        np.testing.assert_array_equal(exported[key], array, err_msg=key)
    assert_exported_logits_match(workdir, out_dir)
