"""Generation with a KV cache: equal to full forward passes, to transformers, on any mesh;
an int8 cache close to the float one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model import attention
from model.attention import dequantize_cache, quantize_cache
from model.decode import cache_bytes_per_token, init_cache, left_pad, sample_next
from model.hf import from_hf
from model.sampler import Sampler, SamplingConfig
from tests.helpers import LLAMA_STYLE, TINY_MODEL, assert_greedy_matches_hf

STYLES = {"gpt2": {}, "llama": LLAMA_STYLE}
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
INT8_GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0, kv_cache_dtype="int8")


def _mesh(data=1, fsdp=1, tensor=1):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def _model(style):
    config = ModelConfig(**{**TINY_MODEL, "max_seq_len": 32, **STYLES[style]})
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return config, model, nn.meta.unbox(params)


def _cached_logits(model, params, prompts, extra, kv_cache_dtype="model"):
    """Generation's calls by hand: (prefill logits [batch, width, vocab], logits of the
    `extra` tokens [batch, steps] fed one per step [batch, steps, vocab], prefill's cache)."""
    tokens, lengths = left_pad(prompts, pad_id=0)
    batch, width = tokens.shape
    pad = width - lengths[:, None]
    index = np.arange(width)[None]
    cache = init_cache(model.config, batch, width + extra.shape[1], kv_cache_dtype)
    apply = jax.jit(model.apply)
    prefill, cache = apply(
        {"params": params},
        tokens,
        (index >= pad).astype(np.int32),
        np.maximum(index - pad, 0),
        cache=cache,
    )
    prefill_cache, stepped = cache, []
    for step in range(extra.shape[1]):
        new = extra[:, step : step + 1]
        logits, cache = apply(
            {"params": params}, new, np.ones_like(new), lengths[:, None] + step, cache=cache
        )
        stepped.append(logits[:, 0])
    return np.asarray(prefill), np.stack(stepped, 1), prefill_cache


@pytest.mark.parametrize("style", STYLES)
def test_cached_logits_equal_a_full_forward_pass(style):
    _, model, params = _model(style)
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1, 4, 6], [12, 13, 14]]  # ragged: left padding
    extra = np.array([[21, 22, 23, 24], [31, 32, 33, 34]], np.int32)
    prefill, stepped, _ = _cached_logits(model, params, prompts, extra)
    width = prefill.shape[1]
    for row, prompt in enumerate(prompts):
        full = model.apply({"params": params}, np.array([prompt + extra[row].tolist()]))[0]
        ours = np.concatenate([prefill[row, width - len(prompt) :], stepped[row]])
        np.testing.assert_allclose(ours, full, atol=1e-4, rtol=1e-4)


def test_int8_cache_entries_dequantize_within_half_a_step():
    magnitudes = jnp.array([1e-3, 1.0, 50.0])[None, None, :, None]  # per kv head
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * magnitudes
    x = x.at[1, 2, 0].set(0.0)  # an all-zero vector
    q, scale = quantize_cache(x)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3)
    assert np.abs(np.asarray(q, np.int32)).max() == 127
    absmax = np.abs(x).max(-1)
    np.testing.assert_allclose(scale, np.where(absmax > 0, absmax / 127, scale), rtol=1e-6)
    assert 0 < scale[1, 2, 0] < 1e-6
    error = np.abs(dequantize_cache(q, scale, jnp.float32) - x)
    assert (error <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert not dequantize_cache(q, scale, jnp.float32)[1, 2, 0].any()

    # What the model writes: layer 0's entries (computed from the same inputs in both caches).
    config, model, params = _model("llama")
    tokens = jnp.array([[5, 9, 2, 7, 11, 3], [12, 13, 14, 1, 2, 3]])
    exact, int8 = (
        jax.jit(model.apply)({"params": params}, tokens, cache=init_cache(config, 2, 8, dtype))[1]
        for dtype in ("model", "int8")
    )
    for name in ("key", "value"):
        assert int8[name].dtype == jnp.int8
        scale = int8[name + "_scale"][0]
        got = dequantize_cache(int8[name][0], scale, jnp.float32)
        assert (np.abs(got - exact[name][0]) <= scale[..., None] / 2 * (1 + 1e-6)).all()
        assert np.abs(exact[name][0]).max() > 0.1  # not trivially small


def test_int8_cache_generation_equals_the_float_cache_where_the_margins_allow(monkeypatch):
    _, model, params = _model("gpt2")  # its margins here are > 100x the int8 error
    prompts = [[5, 9, 2, 7, 11, 3], [12, 13, 14]]
    sampler = Sampler(model.config, params, _mesh(), devices=jax.devices()[:1])
    float_tokens = sampler.generate(prompts, GREEDY, eos_id=-1)
    quantized = []
    monkeypatch.setattr(
        attention, "quantize_cache", lambda x: quantized.append(x) or quantize_cache(x)
    )
    int8_tokens = sampler.generate(prompts, INT8_GREEDY, eos_id=-1)
    assert quantized  # the sampler compiled a generate with the int8 cache

    fed = np.array([row[:-1] for row in float_tokens], np.int32)  # the float run's path
    logits = {}
    for dtype in ("model", "int8"):
        prefill, stepped, _ = _cached_logits(model, params, prompts, fed, dtype)
        logits[dtype] = np.concatenate([prefill, stepped], 1)
    np.testing.assert_allclose(logits["int8"], logits["model"], atol=1e-3)
    error = np.abs(logits["int8"] - logits["model"]).max()
    assert error > 0  # the int8 cache is really used
    generated = logits["model"][:, prefill.shape[1] - 1 :]
    assert np.argmax(generated, -1).tolist() == float_tokens
    top2 = -np.sort(-generated, -1)[..., :2]
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * error  # no argmax can flip
    assert int8_tokens == float_tokens


def test_an_int8_cache_holds_about_half_the_bytes_of_bfloat16():
    config = ModelConfig(
        **{**TINY_MODEL, "embed_dim": 256, "num_heads": 4, "num_kv_heads": 2, "dtype": "bfloat16"}
    )  # head_dim 64
    int8 = cache_bytes_per_token(config, "int8")
    assert int8 == 2 * config.num_layers * 2 * (64 * 1 + 4)
    assert 0.5 < int8 / cache_bytes_per_token(config) < 0.55
    cache = init_cache(config, batch=3, length=5, kv_cache_dtype="int8")
    held = sum(v.nbytes for k, v in cache.items() if k not in ("segment_ids", "index"))
    assert held == 3 * 5 * int8


def _hf_model(style):
    torch.manual_seed(0)
    # A large init makes the argmax depend on every position, so an off-by-one shows.
    common = dict(
        vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3
    )
    if style == "gpt2":
        hf_config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=32, **common
        )
        return transformers.GPT2LMHeadModel(hf_config).eval()
    hf_config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=500.0,
        **common,
    )
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("style", STYLES)
def test_greedy_decoding_equals_transformers_generate(style):
    hf_model = _hf_model(style)
    config, params = from_hf(hf_model, dtype="float32")
    prompts = [[5, 9, 40, 7, 11], [12, 3], [33, 34, 35, 36, 37, 38, 39, 30]]
    eos = 2
    sampler = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    assert_greedy_matches_hf(sampler, hf_model, prompts, eos)


def test_decoding_on_a_sharded_mesh_gives_the_same_tokens():
    config, _, params = _model("llama")
    prompts = [[5, 9, 2, 7], [12, 13], [1, 2, 3, 4, 5, 6], [7]]
    one = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    sharded = Sampler(config, params, _mesh(1, 2, 4))
    wq = sharded.params["layers"]["attn"]["query"]["kernel"]
    assert wq.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)  # really sharded
    for sampling in (GREEDY, SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)):
        assert one.generate(prompts, sampling, eos_id=-1) == sharded.generate(
            prompts, sampling, eos_id=-1
        )


def test_int8_cache_decoding_on_a_sharded_mesh_gives_the_same_tokens():
    config, _, params = _model("llama")  # 4 kv heads: one per tensor shard
    prompts = [[5, 9, 2, 7], [12, 13], [1, 2, 3, 4, 5, 6], [7]]
    one = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    sharded = Sampler(config, params, _mesh(data=2, tensor=4))
    wk = sharded.params["layers"]["attn"]["key"]["kernel"]
    assert wk.addressable_shards[0].data.shape[2] == 1  # one kv head per device
    ours = sharded.generate(prompts, INT8_GREEDY, eos_id=-1)
    assert ours == one.generate(prompts, INT8_GREEDY, eos_id=-1)


def test_ids_past_the_tokenizers_vocabulary_are_never_sampled():
    config, _, params = _model("gpt2")
    sampler = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    hot = SamplingConfig(max_new_tokens=8, temperature=5.0, seed=1)  # nearly uniform
    prompts = [[5, 9, 2, 7]] * 4
    assert max(max(row) for row in sampler.generate(prompts, hot, eos_id=-1)) >= 16
    kept = sampler.generate(prompts, hot, eos_id=-1, num_ids=16)
    assert max(max(row) for row in kept) < 16


def test_a_row_stops_at_eos_and_the_others_go_on():
    config, _, params = _model("llama")
    sampler = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    prompts = [[5, 9, 2, 7], [12, 13, 40]]
    free = sampler.generate(prompts, GREEDY, eos_id=-1)
    assert [len(row) for row in free] == [8, 8]
    eos = free[0][3]
    assert eos not in free[0][:3]
    stopped = sampler.generate(prompts, GREEDY, eos_id=eos)
    assert stopped[0] == free[0][:4]
    cut = free[1].index(eos) + 1 if eos in free[1] else 8
    assert stopped[1] == free[1][:cut]


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = lambda **kw: np.asarray(sample_next(logits, jax.random.key(1), 1.0, **kw))
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.75).tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert set(draws(top_p=0.81).tolist()) == {0, 1, 2}
    assert set(draws(top_k=1).tolist()) == {0}
    freq = np.bincount(draws(), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert np.asarray(sample_next(logits[:1], jax.random.key(0), 0.0)).tolist() == [0]


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(top_p=0.0), r"sampling.top_p=0.0: must be in \(0, 1\]"),
        (dict(top_p=1.5), r"sampling.top_p=1.5: must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"sampling.temperature=-1.0: must be in \[0, inf\)"),
        (dict(top_k=-1), r"sampling.top_k=-1: must be in \[0, inf\)"),
        (dict(max_new_tokens=0), r"sampling.max_new_tokens=0"),
        (dict(kv_cache_dtype="fp8"), r"sampling.kv_cache_dtype='fp8': must be one of model, int8"),
    ],
)
def test_invalid_sampling_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        SamplingConfig(**values)


def test_a_prompt_too_long_is_refused_or_truncated_from_the_left():
    config, _, params = _model("gpt2")  # max_seq_len 32
    sampler = Sampler(config, params, _mesh(), devices=jax.devices()[:1])
    long = list(range(1, 31))
    with pytest.raises(UserError, match=r"prompt 1 has 30 tokens.*at most 24.*--truncate_prompt"):
        sampler.check_room([long], 8, truncate=False)
    assert sampler.check_room([long], 8, truncate=True) == [long[-24:]]
    with pytest.raises(UserError, match=r"--max_new_tokens=32: the model's max_seq_len is 32"):
        sampler.check_room([[1]], 32, truncate=False)
    with pytest.raises(UserError, match="prompt 2 is empty"):
        sampler.check_room([[1], []], 8, truncate=False)
