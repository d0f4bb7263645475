"""Generation with a KV cache: equal to full forward passes, to transformers, on any mesh."""

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
from model.decode import init_cache, left_pad, sample_next
from model.hf import from_hf
from model.sampler import Sampler, SamplingConfig
from tests.helpers import LLAMA_STYLE, TINY_MODEL

STYLES = {"gpt2": {}, "llama": LLAMA_STYLE}
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)


def _mesh(data=1, fsdp=1, tensor=1):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def _model(style):
    config = ModelConfig(**{**TINY_MODEL, "max_seq_len": 32, **STYLES[style]})
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return config, model, nn.meta.unbox(params)


@pytest.mark.parametrize("style", STYLES)
def test_cached_logits_equal_a_full_forward_pass(style):
    config, model, params = _model(style)
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1, 4, 6], [12, 13, 14]]  # ragged: left padding
    tokens, lengths = left_pad(prompts, pad_id=0)
    batch, width = tokens.shape
    pad = width - lengths[:, None]
    index = np.arange(width)[None]
    cache = init_cache(config, batch, width + 4)
    apply = jax.jit(model.apply)
    prefill, cache = apply(
        {"params": params},
        tokens,
        (index >= pad).astype(np.int32),
        np.maximum(index - pad, 0),
        cache=cache,
    )
    extra = [[21, 22, 23, 24], [31, 32, 33, 34]]
    stepped = []
    for step in range(4):
        new = np.array([[row[step]] for row in extra], np.int32)
        logits, cache = apply(
            {"params": params}, new, np.ones_like(new), lengths[:, None] + step, cache=cache
        )
        stepped.append(logits[:, 0])
    for row, prompt in enumerate(prompts):
        full = model.apply({"params": params}, np.array([prompt + extra[row]], np.int32))[0]
        ours = np.concatenate(
            [prefill[row, width - len(prompt) :], np.stack([s[row] for s in stepped])]
        )
        np.testing.assert_allclose(ours, full, atol=1e-4, rtol=1e-4)


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
    ours = sampler.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0.0), eos)
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=eos,
                pad_token_id=0,
            )
        assert new == out[0, len(prompt) :].tolist()


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
