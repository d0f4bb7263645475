"""Hugging Face import: converted GPT-2 / Llama models give the HF logits (float32, 1e-4)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from errors import UserError
from model import Transformer
from model.hf import config_from_hf, from_hf, params_from_hf

VOCAB, POSITIONS, TOLERANCE = 101, 32, 1e-4


def gpt2(**kw):
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )


def llama(**kw):
    kw = {"num_attention_heads": 4, "num_key_value_heads": 4, **kw}
    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=POSITIONS,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        **kw,
    )


def random_model(hf_config, seed=0):
    """A float32 HF model whose every parameter (norm scales and biases too) is random and O(0.1),
    so that a mistake in any one tensor moves the logits far past the tolerance."""
    torch.manual_seed(seed)
    model_cls = GPT2LMHeadModel if hf_config.model_type == "gpt2" else LlamaForCausalLM
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def logits_both(model, **overrides):
    config = config_from_hf(model.config, dtype="float32", **overrides)
    params = params_from_hf(model.state_dict(), config)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, POSITIONS))
    ours = np.asarray(Transformer(config).apply({"params": params}, tokens))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    assert ours.shape == theirs.shape == (2, POSITIONS, VOCAB)
    # Not degenerate: logits spread over tokens and change along the sequence.
    assert theirs.std(axis=-1).mean() > 0.3
    assert np.abs(np.diff(theirs, axis=1)).mean() > 0.1
    return config, ours, theirs


CASES = {
    "gpt2_tied": gpt2(),
    "gpt2_untied": gpt2(tie_word_embeddings=False),
    "llama_mha_tied": llama(tie_word_embeddings=True),
    "llama_gqa_untied": llama(num_key_value_heads=2, tie_word_embeddings=False),
    "llama_mqa_rope_theta": llama(num_key_value_heads=1, rope_theta=500000.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(name):
    config, ours, theirs = logits_both(random_model(CASES[name]))
    assert config.tie_embeddings == CASES[name].tie_word_embeddings
    np.testing.assert_array_less(np.abs(ours - theirs).max(), TOLERANCE)


def test_config_mapping():
    g = config_from_hf(gpt2())
    assert (
        g.position_embedding,
        g.norm,
        g.mlp_activation,
        g.use_bias,
        g.tie_embeddings,
        g.mlp_dim,
        g.max_seq_len,
    ) == ("learned", "layernorm", "gelu", True, True, 256, POSITIONS)
    lc = config_from_hf(llama(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5))
    assert (lc.position_embedding, lc.norm, lc.mlp_activation, lc.use_bias, lc.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    assert (lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.rope_theta, lc.norm_eps) == (
        4,
        2,
        16,
        500000.0,
        1e-5,
    )
    assert config_from_hf(llama(), num_layers=3, dtype="float32").num_layers == 3


def test_rope_theta_is_used():
    """The rope_theta case above can fail: converting with the default theta breaks parity."""
    _, ours, theirs = logits_both(random_model(CASES["llama_mqa_rope_theta"]), rope_theta=10000.0)
    assert np.abs(ours - theirs).max() > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa_untied"])
def test_params_tree_matches_model_init(name):
    hf_config = CASES[name]
    config = config_from_hf(hf_config)
    params = params_from_hf(random_model(hf_config).state_dict(), config)
    variables = jax.eval_shape(
        Transformer(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), np.int32)
    )
    expected = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    assert sorted(got) == sorted(expected)
    for path, spec in expected.items():
        assert isinstance(got[path], np.ndarray), path
        assert (got[path].shape, got[path].dtype) == (spec.shape, spec.dtype), path
    assert got["layers/attn/query/kernel"].shape[0] == config.num_layers
    assert ("lm_head" in got) == (not config.tie_embeddings)


def test_gqa_heads_land_on_the_right_kv_head():
    model = random_model(CASES["llama_gqa_untied"])
    config, params = from_hf(model)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    k_proj = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()  # [kv * d, e]
    np.testing.assert_array_equal(
        params["layers"]["attn"]["key"]["kernel"][1, :, 1, :], k_proj[16:32].T
    )


def test_mismatched_hidden_size_names_the_tensor():
    state_dict = random_model(gpt2()).state_dict()
    config = config_from_hf(
        GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=4)
    )
    with pytest.raises(
        UserError,
        match=r"'transformer\.wte\.weight' has shape \(101, 64\), "
        r"expected \(101, 32\)",
    ):
        params_from_hf(state_dict, config)


def test_wrong_kv_heads_names_the_tensor():
    state_dict = random_model(CASES["llama_gqa_untied"]).state_dict()
    with pytest.raises(UserError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        params_from_hf(state_dict, config_from_hf(llama(tie_word_embeddings=False)))


def test_missing_and_extra_tensors_are_named():
    state_dict = dict(random_model(CASES["llama_gqa_untied"]).state_dict())
    config = config_from_hf(CASES["llama_gqa_untied"])
    with pytest.raises(UserError, match=r"'lm_head\.weight'"):  # untied but no lm_head
        params_from_hf({k: v for k, v in state_dict.items() if k != "lm_head.weight"}, config)
    fewer_layers = config_from_hf(CASES["llama_gqa_untied"], num_layers=1)
    with pytest.raises(UserError, match=r"model\.layers\.1\."):  # a layer left over
        params_from_hf(state_dict, fewer_layers)
    with pytest.raises(UserError, match="not a LlamaForCausalLM checkpoint"):
        params_from_hf({"foo.weight": np.zeros(3)}, config)


@pytest.mark.parametrize(
    "hf_config, what",
    [
        (gpt2(activation_function="relu"), "activation_function"),
        (
            llama(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
            "rope scaling",
        ),
        (llama(attention_bias=True), "attention_bias"),
    ],
)
def test_unsupported_configs_are_refused(hf_config, what):
    with pytest.raises(UserError, match=what):
        config_from_hf(hf_config)
