"""The encoder-decoder (model.encoder_layers > 0): T5Gemma's logits both ways, cached
generation equal to uncached and to transformers' generate, packed cross-attention, and
sharded == unsharded."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration, T5GemmaModuleConfig

from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model.decode import init_cache
from model.hf import config_from_hf, from_hf, params_from_hf, to_hf
from model.sampler import Sampler, SamplingConfig, abstract_params
from sharding.mesh import make_mesh
from sharding.rules import activate, logical_rules
from tests.test_hf_windowed import random_weights

VOCAB, TOLERANCE = 128, 1e-4
BOS, EOS, PAD = 2, 1, 0


def t5gemma(encoder_layers=2, decoder_layers=2, **kw):
    """Each side's layers: local, global."""
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        max_position_embeddings=64,
    )
    module = {**defaults, **kw}
    return T5GemmaConfig(
        encoder=T5GemmaModuleConfig(**module, num_hidden_layers=encoder_layers),
        decoder=T5GemmaModuleConfig(**module, num_hidden_layers=decoder_layers),
        vocab_size=VOCAB,
        attn_implementation="eager",
    )


def hf_model(hf_config=None):
    return random_weights(T5GemmaForConditionalGeneration((hf_config or t5gemma())).eval())


@pytest.fixture(scope="module")
def converted():
    """(T5Gemma with random weights, its meshlm config and params), read once: the tests
    below only read them."""
    model = hf_model()
    return (model, *from_hf(model, dtype="float32"))


def padded(lengths, width, seed):
    """Random tokens [rows, width] with rows of `lengths`, the rest padding; segment ids."""
    tokens = np.random.default_rng(seed).integers(3, VOCAB, size=(len(lengths), width))
    valid = np.arange(width)[None] < np.array(lengths)[:, None]
    return np.where(valid, tokens, PAD), valid.astype(np.int32)


def both_logits(model, config, params):
    encoder, encoder_mask = padded([14, 9], 14, seed=0)
    decoder, decoder_mask = padded([11, 7], 11, seed=1)
    ours = jax.jit(Transformer(config).apply)(
        {"params": params}, decoder, decoder_mask,
        encoder_tokens=encoder, encoder_segment_ids=encoder_mask,
    )
    t = lambda x: torch.as_tensor(np.asarray(x, np.int64))
    with torch.no_grad():
        theirs = model(
            input_ids=t(encoder), attention_mask=t(encoder_mask), decoder_input_ids=t(decoder),
            decoder_attention_mask=t(decoder_mask), use_cache=False,
        ).logits.numpy()
    assert theirs.std(axis=-1).mean() > 0.3
    return np.asarray(ours), theirs, decoder_mask.astype(bool)


def test_t5gemma_logits_match_hf(converted):
    model, config, params = converted
    assert (config.encoder_layers, config.num_layers, config.encoder_sliding_window) == (2, 2, 5)
    ours, theirs, valid = both_logits(model, config, params)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), TOLERANCE)


def test_t5gemma_export_loads_into_transformers_and_round_trips(converted):
    _, config, params = converted
    hf_config, state = to_hf(config, params, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    rebuilt = T5GemmaForConditionalGeneration(
        T5GemmaConfig(**hf_config, attn_implementation="eager")
    ).eval()
    missing, unexpected = rebuilt.load_state_dict(
        {k: torch.as_tensor(v) for k, v in state.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.out_proj.weight"}  # tied
    ours, theirs, valid = both_logits(rebuilt, config, params)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), TOLERANCE)
    back = params_from_hf(state, config_from_hf(rebuilt.config, dtype="float32"))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_unbalanced_t5gemma_is_refused():
    hf_config = t5gemma()
    hf_config.encoder.hidden_size = 128
    with pytest.raises(UserError, match="hidden_size 128 vs 32"):
        config_from_hf(hf_config)


def test_cached_decoding_equals_a_full_forward_pass(converted):
    """Prefill (encode once, cross keys and values cached) then one token per call."""
    _, config, params = converted
    apply = jax.jit(Transformer(config).apply)
    encoder, encoder_mask = padded([14, 9], 14, seed=0)
    decoder = np.random.default_rng(2).integers(3, VOCAB, size=(2, 9))
    full = apply(
        {"params": params}, decoder, encoder_tokens=encoder, encoder_segment_ids=encoder_mask
    )
    cache = init_cache(config, 2, 9, encoder_length=14)
    logits, cache = apply(
        {"params": params}, decoder[:, :4], cache=cache,
        encoder_tokens=encoder, encoder_segment_ids=encoder_mask,
    )
    stepped = [logits]
    for t in range(4, 9):
        logits, cache = apply(
            {"params": params}, decoder[:, t : t + 1], positions=np.full((2, 1), t), cache=cache
        )
        stepped.append(logits)
    np.testing.assert_allclose(np.concatenate(stepped, 1), full, atol=1e-4)


def test_a_packed_row_attends_only_to_its_own_encoder_segment():
    """Two examples packed in one row on both sides give each example's own logits."""
    config = ModelConfig(
        vocab_size=VOCAB, embed_dim=32, num_heads=4, mlp_dim=64, num_layers=2, encoder_layers=2,
        dtype="float32", position_embedding="rope", init_std=0.2,
    )
    model = Transformer(config)
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(3)
    enc = [rng.integers(3, VOCAB, n) for n in (6, 5)]
    dec = [rng.integers(3, VOCAB, n) for n in (4, 7)]
    params = jax.jit(model.init)(jax.random.key(0), dec[0][None], encoder_tokens=enc[0][None])
    params = params["params"]
    alone = [
        apply({"params": params}, d[None], encoder_tokens=e[None])[0]
        for e, d in zip(enc, dec)
    ]
    segments = lambda parts: np.concatenate([np.full(len(p), k + 1) for k, p in enumerate(parts)])
    positions = lambda parts: np.concatenate([np.arange(len(p)) for p in parts])
    packed = apply(
        {"params": params}, np.concatenate(dec)[None], segments(dec)[None], positions(dec)[None],
        encoder_tokens=np.concatenate(enc)[None], encoder_segment_ids=segments(enc)[None],
        encoder_positions=positions(enc)[None],
    )[0]
    np.testing.assert_allclose(packed, np.concatenate(alone), atol=1e-4)


def test_sharded_equals_unsharded(converted):
    """The encoder-decoder's params and activations sharded by the rules on a data x fsdp x
    tensor mesh give the single-device logits."""
    _, config, params = converted
    encoder, encoder_mask = padded([14, 9, 12, 5], 14, seed=0)
    decoder, decoder_mask = padded([11, 7, 3, 10], 11, seed=1)
    apply = lambda p: Transformer(config).apply(
        {"params": p}, decoder, decoder_mask,
        encoder_tokens=encoder, encoder_segment_ids=encoder_mask,
    )
    single = jax.jit(apply)(params)
    mesh_config = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
    mesh, rules = make_mesh(mesh_config), logical_rules()
    abstract = abstract_params(Transformer(config), mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    with activate(mesh, rules):
        sharded = jax.jit(apply)(jax.device_put(params, shardings))
    assert len(jax.tree.leaves(shardings)[0].device_set) == 8
    np.testing.assert_allclose(sharded, single, atol=1e-4)


def test_an_encoder_decoder_needs_encoder_tokens(converted):
    _, config, params = converted
    with pytest.raises(UserError, match="encoder_inputs"):
        Transformer(config).apply({"params": params}, np.ones((1, 4), int))


def test_greedy_generation_equals_transformers_generate():
    """sample.py's path (Sampler): the prompt is encoded once and decoding starts from bos,
    as T5Gemma's generate does; the Sampler pads the batch to its buckets, so the encoder
    sees left padding."""
    hf = hf_model(t5gemma(3, hidden_size=64, intermediate_size=96))  # wide enough to vary
    with torch.no_grad():  # else the scaled start token's own logit wins every step
        hf.model.decoder.embed_tokens.weight.mul_(0.3)
    config, params = from_hf(hf, dtype="float32")
    mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sampler = Sampler(config, params, mesh, devices=jax.devices()[:1])
    prompts = [[5, 9, 40, 7, 11, 60, 61, 62, 70], [12, 3]]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    ours = sampler.generate(prompts, sampling, eos_id=EOS, pad_id=PAD, start_id=BOS)
    assert len(set(ours[0])) > 2 and ours[0] != ours[1]  # the output depends on the prompt
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                do_sample=False, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
            )
        assert out[0, 0] == BOS and new == out[0, 1:].tolist()
    with pytest.raises(UserError, match="no bos"):
        sampler.generate(prompts, sampling, eos_id=EOS)
