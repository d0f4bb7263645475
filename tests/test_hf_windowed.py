"""ModernBERT and Gemma 2: local/global attention layers and the block features they need
(embedding norm and scale, post-norms, GeGLU, soft-capping, the masked-LM head) give the
Hugging Face logits, both ways, and decode with a KV cache as transformers generates."""

import json
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    ModernBertConfig,
    ModernBertForMaskedLM,
)

import compress
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model.hf import config_from_hf, from_hf, params_from_hf, to_hf
from model.sampler import Sampler, SamplingConfig
from tests.helpers import assert_greedy_matches_hf
from training.optimizer import weight_decay_mask

VOCAB, LENGTH, TOLERANCE = 128, 24, 1e-4


SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def modernbert(**kw):
    return ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,  # global, local, local, global
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=8,  # keys at |i - j| <= 4 in the local layers
        cls_token_id=1,
        sep_token_id=2,
        attn_implementation="eager",
        **SPECIAL_IDS,
        **kw,
    )


def gemma2(config_class=Gemma2Config, **kw):
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,  # local, global, local, global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=24,  # not head_dim, so the scale shows
        attn_logit_softcapping=2.0,  # small caps, so they bite
        final_logit_softcapping=3.0,
        max_position_embeddings=64,
        attn_implementation="eager",
        **SPECIAL_IDS,
    )
    return config_class(**{**defaults, **kw})


def gemma3(**kw):
    """Gemma 2's shapes with Gemma 3's q/k norms, 5 local layers per global one and local
    layers of their own RoPE base (its attention ignores gemma2()'s attn_logit_softcapping),
    and its default: no final soft-cap."""
    return gemma2(Gemma3TextConfig, **{"num_hidden_layers": 6, "final_logit_softcapping": None,
                                       **kw})


CLASSES = {
    "modernbert": ModernBertForMaskedLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}


def random_model(hf_config, seed=0):
    return random_weights(CLASSES[hf_config.model_type](hf_config).eval(), seed)


def random_weights(model, seed=0):
    """`model` with every parameter random at a scale where each one moves the logits:
    matrices with std fan_in ** -0.5, vectors (norm scales, biases) N(0, 0.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            std = 0.5 if param.ndim == 1 else param.shape[-1] ** -0.5
            param.copy_(std * torch.randn_like(param))
    return model


def both_logits(model, config, params, lengths=(LENGTH, LENGTH - 7)):
    """(ours, theirs, valid) for rows of these lengths (the rest padding, segment 0)."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(len(lengths), LENGTH))
    valid = np.arange(LENGTH)[None] < np.array(lengths)[:, None]
    tokens = np.where(valid, tokens, 0)
    ours = jax.jit(Transformer(config).apply)({"params": params}, tokens, valid.astype(np.int32))
    with torch.no_grad():
        theirs = model(
            torch.as_tensor(tokens), attention_mask=torch.as_tensor(valid.astype(np.int64))
        ).logits.numpy()
    assert theirs.std(axis=-1).mean() > 0.3  # not degenerate
    return np.asarray(ours), theirs, valid


@pytest.mark.parametrize("make", [modernbert, gemma2, gemma3])
def test_logits_match_hf_with_padding(make):
    model = random_model(make())
    config, params = from_hf(model, dtype="float32")
    ours, theirs, valid = both_logits(model, config, params)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), TOLERANCE)


def test_config_mapping():
    m = config_from_hf(modernbert(global_attn_every_n_layers=2))
    assert (m.attention_pattern, m.sliding_window, m.rope_theta, m.local_rope_theta) == (
        "GL", 5, 160000.0, 10000.0
    )
    assert (m.attention_mask, m.mlp_activation, m.gelu_approximate, m.prediction_head) == (
        "bidirectional", "geglu", False, True
    )
    g = config_from_hf(gemma2())
    assert (g.attention_pattern, g.sliding_window, g.query_pre_attn_scalar) == ("LG", 5, 24)
    assert (g.attn_logit_softcap, g.final_logit_softcap, g.embed_scale, g.post_norms) == (
        2.0, 3.0, True, True
    )
    assert config_from_hf(gemma2(final_logit_softcapping=None)).final_logit_softcap == 0.0
    g3 = config_from_hf(gemma3())
    assert (g3.attention_pattern, g3.qk_norm, g3.rope_theta, g3.local_rope_theta) == (
        "LLLLLG", True, 1e6, 1e4
    )


def test_config_json_of_transformers_4_is_read():
    """The Hub's config.json files predate layer_types and per-type rope_parameters."""
    def old_style(hf_config, **keys):
        values = {k: v for k, v in hf_config.to_dict().items()}
        del values["layer_types"], values["rope_parameters"]
        return types.SimpleNamespace(**values, **keys)

    m = config_from_hf(old_style(
        modernbert(), global_attn_every_n_layers=3, global_rope_theta=8e4, local_rope_theta=5e3
    ))
    assert (m.attention_pattern, m.rope_theta, m.local_rope_theta) == ("GLL", 8e4, 5e3)
    g = config_from_hf(old_style(gemma2(), rope_theta=500.0))
    assert (g.attention_pattern, g.rope_theta) == ("LG", 500.0)


EXPORTED = {
    "modernbert": modernbert,
    "gemma2": gemma2,
    "gemma3": gemma3,  # its default: no final soft-cap
    "gemma2_no_caps": lambda: gemma2(attn_logit_softcapping=None, final_logit_softcapping=None),
    "modernbert_all_global": lambda: modernbert(global_attn_every_n_layers=1),
    "gemma3_all_global": lambda: gemma3(layer_types=["full_attention"] * 6),
}


@pytest.mark.parametrize("name", EXPORTED)
def test_export_loads_into_transformers_and_round_trips(name):
    """meshlm -> HF config.json dict + state dict -> the HF class gives our logits; and back
    to meshlm bit for bit. Models without caps or without local layers too: their caps and
    windows must be written as HF reads "none"."""
    model = random_model(EXPORTED[name]())
    config, params = from_hf(model, dtype="float32")
    hf_config, state = to_hf(config, params, **SPECIAL_IDS, cls_token_id=1, sep_token_id=2)
    rebuilt_config = type(model.config)(**hf_config, attn_implementation="eager")
    rebuilt = type(model)(rebuilt_config).eval()
    missing, unexpected = rebuilt.load_state_dict(
        {k: torch.as_tensor(v) for k, v in state.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight", "decoder.weight"}  # tied
    ours, theirs, valid = both_logits(rebuilt, config, params)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), TOLERANCE)
    back = params_from_hf(state, config_from_hf(rebuilt_config, dtype="float32"))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_gemma2_greedy_decoding_equals_transformers_generate():
    """Sliding windows, soft-capping and the scaled embedding in the KV-cache path: prompts
    and generations longer than the window."""
    hf_model = random_model(gemma2())
    with torch.no_grad():  # else the scaled embedding of the last token wins every step
        hf_model.model.embed_tokens.weight.mul_(0.2)
    config, params = from_hf(hf_model, dtype="float32")
    mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sampler = Sampler(config, params, mesh, devices=jax.devices()[:1])
    prompts = [[5, 9, 40, 7, 11, 60, 61, 62], [12, 3]]
    assert_greedy_matches_hf(sampler, hf_model, prompts, eos=2, max_new_tokens=10)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    assert all(len(set(new)) > 3 for new in sampler.generate(prompts, greedy, eos_id=2))


@pytest.mark.parametrize("make", [gemma2, modernbert])
def test_blockwise_attention_equals_xla_for_local_layers_and_caps(make):
    """The local-window mask (causal and bidirectional, and the tiles it skips) and the
    soft-capped scores (and their gradient) in flash-style tiles smaller than the window,
    against the dense reference."""
    hf_config = make()
    config = config_from_hf(hf_config, dtype="float32", attention_block_size=4)
    params = params_from_hf(random_model(hf_config).state_dict(), config)
    tokens = np.random.default_rng(1).integers(3, VOCAB, size=(2, 19))

    def loss_and_grads(implementation):
        model = Transformer(config.__class__(**{
            **config.__dict__, "attention_implementation": implementation
        }))
        loss = lambda p: model.apply({"params": p}, tokens).std()
        return jax.jit(jax.value_and_grad(loss))(params)

    (xla, xla_grads), (block, block_grads) = map(loss_and_grads, ["xla", "blockwise"])
    np.testing.assert_allclose(block, xla, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), block_grads, xla_grads)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sliding_window=4), "local layers"),
        (dict(attention_pattern="LG"), "need a window"),
        (dict(attention_pattern="GX", sliding_window=4), "string of G"),
    ],
)
def test_bad_local_attention_configs_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**fields)


def test_the_heads_bias_gets_no_weight_decay_and_compression_refuses_the_head():
    config = config_from_hf(modernbert())
    boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0), np.ones((1, 4), int))
    boxed = boxed["params"]
    decayed = weight_decay_mask(boxed, decay_embeddings=True)
    assert not decayed["output_bias"] and decayed["head"]["kernel"]
    args = types.SimpleNamespace(prune="", low_rank="", quantize="int8", sparsity=None, n_m="")
    with pytest.raises(UserError, match="model.prediction_head=True"):
        compress.check_request(args, config)


def test_the_chunked_loss_refuses_logits_it_cannot_make():
    config = config_from_hf(gemma2(), dtype="float32")
    params = params_from_hf(random_model(gemma2()).state_dict(), config)
    with pytest.raises(UserError, match="loss_chunk_size=0"):
        Transformer(config).apply({"params": params}, np.ones((1, 4), int), return_hidden=True)


@pytest.mark.parametrize("family", ["modernbert", "t5gemma"])
def test_files_round_trip_through_a_workdir(tmp_path, family):
    """tools/import_hf then tools/export_hf give back the saved files bit for bit: packed
    nn.Linear weights (ModernBERT's Wqkv, Wi) and a nested config.json (T5Gemma's); the
    workdir trains by the model's own objective."""
    from tests.test_encoder_decoder import hf_model as t5gemma_model
    from tests.test_hf_interop import save_hf, tensors
    from tools import export_hf, import_hf

    model = random_model(modernbert()) if family == "modernbert" else t5gemma_model()
    hf_dir = save_hf(model, tmp_path / "hf")
    import_hf.main([hf_dir, f"--workdir={tmp_path / 'w'}"])
    export_hf.export_hf(str(tmp_path / "w"), str(tmp_path / "out"), 2**30)
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with open(tmp_path / "w" / "config.json") as f:
        objective = json.load(f)["train"]["objective"]
    assert objective == {"modernbert": "mlm", "t5gemma": "span_corruption"}[family]
