"""model.attention_mask: causal, bidirectional and prefix masks, with packed documents and
padding, in the reference and blockwise attention, through the model and its KV cache.

cudnn runs only on NVIDIA GPUs and splash's prefix fallback only on TPUs: not tested here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import ModelConfig, Transformer
from model.attention_ops import attend, attention_mask
from model.decode import generate, init_cache, left_pad
from model.splash_attention import splash_attention
from tests.helpers import TINY_MODEL
from tests.test_attention_ops import value_and_grads

KINDS = ("causal", "bidirectional", "prefix")


def packed_rows(batch, length, seed):
    """(segment ids, prefix mask) [batch, length]: documents of random lengths, each with a
    random prefix (possibly empty or whole), then padding (segment 0, no prefix)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    prefix = np.zeros((batch, length), bool)
    for row in range(batch):
        start, doc = 0, 1
        while start < length - 3:
            size = int(rng.integers(2, 9))
            segments[row, start : start + size] = doc
            prefix[row, start : start + int(rng.integers(0, size + 1))] = True
            start, doc = start + size, doc + 1
        prefix[row] &= segments[row] > 0
    return segments, prefix


def numpy_mask(kind, segments, prefix, window=0):
    """The rule of model/attention_ops.py, one (row, query, key) at a time."""
    batch, length = segments.shape
    mask = np.zeros((batch, 1, length, length), bool)
    for r, i, j in np.ndindex(batch, length, length):
        sees = {
            "causal": j <= i,
            "bidirectional": True,
            "prefix": j <= i or (prefix[r, i] and prefix[r, j]),
        }[kind]
        near = window <= 0 or abs(i - j) < window
        mask[r, 0, i, j] = segments[r, i] == segments[r, j] and sees and near
    return mask


@pytest.mark.parametrize("window", [0, 3])  # 0: a global layer; 3: a local layer's window
@pytest.mark.parametrize("kind", KINDS)
def test_masks_match_a_numpy_construction(kind, window):
    segments, prefix = packed_rows(batch=3, length=24, seed=1)
    assert (segments == 0).any() and prefix.any() and (~prefix & (segments > 0)).any()
    mask = attention_mask(segments, segments, 24, 24, 0, kind, prefix, prefix, jnp.int32(window))
    np.testing.assert_array_equal(mask, numpy_mask(kind, segments, prefix, window))


def test_prefix_without_a_prefix_mask_and_causal_with_one_are_causal():
    segments, prefix = packed_rows(batch=2, length=12, seed=2)
    causal = attention_mask(segments, segments, 12, 12)
    no_prefix = attention_mask(segments, segments, 12, 12, 0, "prefix")
    np.testing.assert_array_equal(no_prefix, causal)
    ignored = attention_mask(segments, segments, 12, 12, 0, "causal", prefix, prefix)
    np.testing.assert_array_equal(ignored, causal)


@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_matches_the_reference(kind):
    """Outputs and gradients, packed rows with padding and prefixes, GQA, 20 tokens in tiles
    of 8 (not a divisor): bidirectional and prefix must visit the tiles above the diagonal."""
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, head_dim = 2, 20, 4, 2, 8
    query = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    key, value = (
        jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
        for _ in "kv"
    )
    segments, prefix = (jnp.asarray(x) for x in packed_rows(batch, length, seed=3))
    weights = rng.normal(size=query.shape).astype(np.float32)

    def run(implementation):
        fn = lambda q, k, v: attend(
            q, k, v, segments, segments, 0, implementation, 8, kind, prefix, prefix
        )
        return value_and_grads(fn, query, key, value, weights)

    (expected, expected_grads), (out, grads) = run("xla"), run("blockwise")
    np.testing.assert_allclose(out, expected, atol=1e-5)
    for name, got, want in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


def test_splash_bidirectional_kernel_matches_the_reference_in_the_pallas_interpreter():
    rng = np.random.default_rng(0)
    query, key, value = (
        jnp.asarray(rng.normal(size=(1, 128, 2, 64)), jnp.float32) for _ in "qkv"
    )
    segments = jnp.asarray([[1] * 50 + [2] * 60 + [0] * 18])
    out = splash_attention(
        query, key, value, segments, segments, 128, "bidirectional", interpret=True
    )
    expected = attend(query, key, value, segments, segments, mask_kind="bidirectional")
    np.testing.assert_allclose(out, expected, atol=5e-5)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 16)), jnp.int32)
SEGMENTS = jnp.asarray([[1] * 10 + [2] * 6])  # two packed documents
PREFIX = jnp.asarray([[1] * 6 + [0] * 4 + [1] * 3 + [0] * 3])  # 6 and 3 prefix tokens
# Larger weights than the default 0.02 make greedy tokens depend on what each token sees.
MODEL = dict(TINY_MODEL, init_std=0.5)


@functools.cache
def model_and_apply(kind):
    """(model, jitted model.apply) with model.attention_mask=`kind`."""
    model = Transformer(ModelConfig(**MODEL, attention_mask=kind))
    return model, jax.jit(model.apply)


@functools.cache
def variables():
    """One set of weights for every kind (the mask adds no parameter)."""
    return jax.jit(model_and_apply("causal")[0].init)(jax.random.key(0), TOKENS)


def logits_after_changing(kind, position):
    """(logits, logits with the token at `position` changed), [16, vocab] each."""
    apply = model_and_apply(kind)[1]
    changed = TOKENS.at[0, position].set((TOKENS[0, position] + 1) % 64)
    logits = lambda tokens: apply(variables(), tokens, SEGMENTS, prefix_mask=PREFIX)[0]
    return logits(TOKENS), logits(changed)


def moved(before, after):
    """Per position: do the logits differ?"""
    return np.abs(np.asarray(before) - np.asarray(after)).max(-1) > 1e-6


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_a_later_token_changes_earlier_logits_only_when_bidirectional(kind):
    changed = moved(*logits_after_changing(kind, position=5))
    assert (changed[:5] == (kind == "bidirectional")).all()
    assert changed[5:10].all() and not changed[10:].any()  # the other document: never


def test_a_prefix_token_sees_later_prefix_tokens_but_not_the_continuation():
    changed = moved(*logits_after_changing("prefix", position=4))  # in the prefix
    assert changed[:10].all() and not changed[10:].any()
    changed = moved(*logits_after_changing("prefix", position=7))  # in the continuation
    assert not changed[:7].any() and changed[7:10].all() and not changed[10:].any()
    changed = moved(*logits_after_changing("prefix", position=14))  # after doc 2's prefix
    assert not changed[:14].any()


def test_a_prefix_model_prefills_its_prompt_as_the_prefix_then_decodes_causally():
    """With a KV cache: the prefill (the prompt as prefix) and a decode step after it equal
    the full forward of prompt + token, the token outside the prefix."""
    model, apply = model_and_apply("prefix")
    tokens, lengths = left_pad([[5, 9, 2, 7, 1, 3], [8, 4, 6, 2]], pad_id=0)
    segments = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int32)
    positions = np.maximum(np.arange(6)[None] - (6 - lengths[:, None]), 0)
    cache = init_cache(model.config, 2, 8)
    prefill, cache = apply(
        variables(), tokens, segments, positions, cache=cache, prefix_mask=segments
    )
    new = np.asarray([[11], [12]], np.int32)
    step, _ = apply(variables(), new, np.ones_like(new), lengths[:, None], cache=cache)

    extended = lambda a, b: np.concatenate([a, b], axis=1)
    full = apply(
        variables(),
        extended(tokens, new),
        extended(segments, np.ones_like(new)),
        extended(positions, lengths[:, None]),
        prefix_mask=extended(segments, np.zeros_like(new)),
    )
    np.testing.assert_allclose(prefill, full[:, :6], atol=1e-5)
    np.testing.assert_allclose(step[:, -1], full[:, -1], atol=1e-5)


def test_generate_prefills_the_prompt_as_the_prefix():
    """Greedy tokens equal those of the full forward with the prompt as the prefix (and differ
    from those without it, so the prefix did change them)."""
    model, apply = model_and_apply("prefix")
    prompt = [int(t) for t in TOKENS[0, :8]]
    tokens, lengths = left_pad([prompt], pad_id=0)
    params = variables()["params"]
    new, _ = jax.jit(
        lambda p: generate(model, p, tokens, lengths, jax.random.key(0), max_new_tokens=4)
    )(params)

    def greedy(prefix_len):
        """4 tokens, each the argmax of the full forward (the slots after it: padding)."""
        sequence = np.array(TOKENS)
        prefix = jnp.asarray(np.arange(16) < prefix_len, jnp.int32)[None]
        for t in range(8, 12):
            segments = jnp.asarray(np.arange(16) < t, jnp.int32)[None]
            logits = apply(variables(), sequence, segments, prefix_mask=prefix)
            sequence[0, t] = int(jnp.argmax(logits[0, t - 1]))
        return sequence[0, 8:12].tolist()

    assert new[0].tolist() == greedy(len(prompt))
    assert greedy(len(prompt)) != greedy(0)


def test_a_bidirectional_model_refuses_to_generate():
    model = model_and_apply("bidirectional")[0]
    tokens, lengths = left_pad([[5, 9, 2]], pad_id=0)
    with pytest.raises(UserError, match="model.attention_mask=bidirectional"):
        jax.eval_shape(
            lambda p: generate(model, p, tokens, lengths, jax.random.key(0), max_new_tokens=2),
            variables()["params"],
        )
