"""Autoregressive generation with a KV cache, as one traceable function.

    tokens, lengths = left_pad(prompts, pad_id)
    new_tokens, num_new = generate(model, params, tokens, lengths, rng, max_new_tokens=64)

The prompts are left-padded to one length P, so every row's last prompt token
sits at index P-1 and one scalar cache index serves the whole batch; each row
keeps its own positions (0 at its first real token) and padding is segment 0,
which no real token attends to. The whole prompt is prefilled in one forward
pass, then one token per step is decoded inside a `lax.while_loop`: the
decode position is data, not a static argument, so nothing is re-traced per
token. Sampling: greedy (temperature 0), or temperature, then top-k, then
top-p (nucleus), as in Hugging Face's `generate`. The prompt is the prefill's
prefix_mask: a prefix LM (model.attention_mask=prefix) attends bidirectionally within
it, then decodes causally; a masked LM (bidirectional) is refused (model/attention.py).

The cache holds keys and values in the model's compute dtype, or (kv_cache_dtype
"int8") as int8 with one float32 absmax scale per (row, position, KV head): head_dim + 4
bytes per head vector, about half a bfloat16 cache for head_dim >= 64. model/attention.py
quantizes what it writes and dequantizes the layer's slice before attending.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.attention import CACHE_AXES, CACHE_SCALE_AXES
from model.config import ModelConfig

CACHE_LOGICAL_AXES = {
    "key": ("layers",) + CACHE_AXES,
    "value": ("layers",) + CACHE_AXES,
    "key_scale": ("layers",) + CACHE_SCALE_AXES,
    "value_scale": ("layers",) + CACHE_SCALE_AXES,
    "segment_ids": ("batch", "length"),
    "index": (),
    "cross_key": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "cross_value": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "cross_segment_ids": ("batch", "length"),
}


KV_CACHE_DTYPES = ("model", "int8")


def init_cache(
    config: ModelConfig, batch: int, length: int, kv_cache_dtype="model", encoder_length=0
) -> dict:
    """An empty cache for `length` tokens: keys and values in the compute dtype ("model"),
    or int8 beside float32 "key_scale"/"value_scale" ("int8"). An encoder-decoder's also
    holds its cross-attention's keys and values over `encoder_length` encoder tokens (in
    the compute dtype), which the prefill writes (model/attention.py CrossAttention)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: one of {KV_CACHE_DTYPES}")
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    dtype = jnp.int8 if kv_cache_dtype == "int8" else config.dtype
    cache = {
        "key": jnp.zeros(shape, dtype),
        "value": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),  # 0: nothing there yet
        "index": jnp.zeros((), jnp.int32),
    }
    if kv_cache_dtype == "int8":
        cache["key_scale"] = cache["value_scale"] = jnp.zeros(shape[:-1], jnp.float32)
    if config.encoder_layers:
        cross = (config.num_layers, batch, encoder_length, config.num_kv_heads, config.head_dim)
        cache["cross_key"] = cache["cross_value"] = jnp.zeros(cross, config.dtype)
        cache["cross_segment_ids"] = jnp.zeros((batch, encoder_length), jnp.int32)
    return {k: nn.with_logical_constraint(v, CACHE_LOGICAL_AXES[k]) for k, v in cache.items()}


def cache_bytes_per_token(config: ModelConfig, kv_cache_dtype="model") -> int:
    """Bytes the cache holds per token of one sequence: keys and values of every layer
    (int8: a byte per value and a float32 scale per head vector)."""
    if kv_cache_dtype == "int8":
        per_head = config.head_dim + 4
    else:
        per_head = config.head_dim * np.dtype(config.dtype).itemsize
    return config.num_layers * 2 * config.num_kv_heads * per_head


def left_pad(prompts: list[list[int]], pad_id: int, length: int = 0):
    """(tokens [batch, max(length, longest)] int32 left-padded, lengths [batch] int32)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = max(length, int(lengths.max()))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
    return tokens, lengths


def sample_next(logits, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next token ids [batch] from float32 logits [batch, vocab].

    temperature 0 is greedy (argmax; top_k and top_p are then irrelevant). Otherwise
    logits / temperature, keeping the `top_k` largest (0 = all), then the smallest
    set of tokens whose probability reaches `top_p` (1 = all).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    if top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, descending, jnp.inf)  # the top token always stays
        logits = jnp.where(logits >= kept.min(axis=-1, keepdims=True), logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model,
    params,
    tokens: jax.Array,
    lengths: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = -1,
    pad_id: int = 0,
    num_ids: int = 0,
    kv_cache_dtype: str = "model",
    start_id: int = 0,
):
    """(new tokens [batch, max_new_tokens], number generated per row [batch]).

    `tokens` [batch, P] are left-padded prompts of `lengths` tokens (see left_pad).
    A row stops after its first `eos_id` (which is kept); later slots hold `pad_id`.
    Ids from `num_ids` on (0 = none) are never sampled: a vocabulary padded past the
    tokenizer's for speed has ids no tokenizer can decode.
    The cache holds keys and values as `kv_cache_dtype` ("model" or "int8", see init_cache).
    An encoder-decoder (model.encoder_layers > 0) encodes the prompts once, in the prefill,
    and decodes from `start_id` (the decoder's start token; T5Gemma's is bos).
    Traceable: jit it, with the sampling arguments and kv_cache_dtype static.
    """
    batch, prompt_len = tokens.shape
    pad = prompt_len - lengths[:, None]
    index = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    segment_ids = (index >= pad).astype(jnp.int32)
    positions = jnp.maximum(index - pad, 0)
    encoder, cache_len = {}, prompt_len + max_new_tokens
    if model.config.encoder_layers:  # the prompt is the encoder's; the decoder starts afresh
        encoder = dict(
            encoder_tokens=tokens, encoder_segment_ids=segment_ids, encoder_positions=positions
        )
        tokens = jnp.full((batch, 1), start_id, jnp.int32)
        segment_ids, positions = jnp.ones_like(tokens), jnp.zeros_like(tokens)
        lengths, cache_len = jnp.ones_like(lengths), 1 + max_new_tokens
    cache = init_cache(model.config, batch, cache_len, kv_cache_dtype, encoder_length=prompt_len)
    variables = {"params": params}
    sample = lambda logits, step: sample_next(
        logits[:, -1, : num_ids or None], jax.random.fold_in(rng, step), temperature, top_k, top_p
    )

    logits, cache = model.apply(
        variables, tokens, segment_ids, positions, cache=cache, prefix_mask=segment_ids, **encoder
    )
    first = sample(logits, 0)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id

    def more(state):
        step, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(state):
        step, out, cache, done = state
        previous = lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
        logits, cache = model.apply(
            variables, previous, jnp.ones_like(previous), (lengths + step - 1)[:, None], cache=cache
        )
        token = jnp.where(done, pad_id, sample(logits, step))
        out = lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, out, cache, done | (token == eos_id)

    step, out, _, _ = lax.while_loop(more, decode_one, (jnp.int32(1), out, cache, done))
    first_eos = jnp.argmax(out == eos_id, axis=1)
    num_new = jnp.where(jnp.any(out == eos_id, axis=1), first_eos + 1, step)
    return out, num_new.astype(jnp.int32)
