"""Generation benchmark: prefill and decode tokens/s, cached vs uncached, KV-cache size.

    python benchmarks/decode.py [--config=configs/default.py] [--prompt_len=512]
        [--new_tokens=64] [--batch_sizes=1,32] [--kv_cache_dtypes=model,int8] [--repeats=3]
        [--config.model.dtype=bfloat16]

A randomly initialised model of the config's shape (the speed does not depend on
the weights) on a mesh of every device, data-parallel (`model.sampler.Sampler`). For each
batch size: the prefill of `prompt_len` tokens per row, then `new_tokens` greedy
tokens in the jitted decode loop (its time: generating `new_tokens` minus generating 1),
once per KV-cache dtype: the model's ("model"; JSON key batchN) and int8 with scales
("int8"; batchN_int8_kv). Uncached decoding, for comparison at batch 1:
one jitted forward pass over the whole fixed-size window per new token, which is
what generation without a cache costs when shapes are static. The model's
max_seq_len is raised to prompt_len + new_tokens when it is smaller (a learned
position table grows; nothing else changes). Median of `repeats` timed runs
after one compiling run; the last line printed is JSON with every number.
"""

import dataclasses
import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from model import Transformer  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decode import KV_CACHE_DTYPES, cache_bytes_per_token, init_cache  # noqa: E402
from model.sampler import Sampler, SamplingConfig  # noqa: E402


def define_flags():
    """Only when run as a script: benchmarks/accelerator.py imports this module beside
    train_step.py, which defines --config too."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/default.py"), "Config whose model is measured."
    )
    flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per row.")
    flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
    flags.DEFINE_list("batch_sizes", ["1", "32"], "Rows per generate call.")
    flags.DEFINE_list("kv_cache_dtypes", list(KV_CACHE_DTYPES), "KV-cache dtypes measured.")
    flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")


FLAGS = flags.FLAGS


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_sampler(model_fields, length: int):
    """(Sampler, ModelConfig) of a randomly initialised model of `model_fields`' shape (the
    speed does not depend on the weights), its max_seq_len raised to `length` if smaller, on a
    data-parallel mesh of every device."""
    model_config = ModelConfig.from_dict(model_fields)
    if model_config.max_seq_len < length:
        model_config = dataclasses.replace(model_config, max_seq_len=length)
    random_params = jax.jit(
        lambda key: nn.meta.unbox(
            Transformer(model_config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        )
    )(jax.random.key(0))
    mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return Sampler(model_config, random_params, mesh), model_config  # places them on the mesh


def decode_speeds(sampler, rows, kv_cache_dtype: str, new_tokens: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of greedy generation from the prompts `rows` (token lists
    of one length) with a KV cache of `kv_cache_dtype`."""
    model_config, (batch, prompt_len) = sampler.model.config, np.shape(rows)
    length = prompt_len + new_tokens
    tokens = jnp.asarray(rows, jnp.int32)

    @jax.jit
    def prefill(params, tokens):
        cache = init_cache(model_config, batch, length, kv_cache_dtype)
        return sampler.model.apply({"params": params}, tokens, cache=cache)[0][:, -1]

    sampling = SamplingConfig(
        max_new_tokens=new_tokens, temperature=0.0, kv_cache_dtype=kv_cache_dtype
    )
    one_token = dataclasses.replace(sampling, max_new_tokens=1)
    prefill_s = median_seconds(functools.partial(prefill, sampler.params, tokens), repeats)
    generate_s = median_seconds(
        functools.partial(sampler.generate, rows, sampling, eos_id=-1), repeats
    )
    first_token_s = median_seconds(
        functools.partial(sampler.generate, rows, one_token, eos_id=-1), repeats
    )
    decode_s = max(generate_s - first_token_s, 1e-9)  # the loop's new_tokens - 1 steps
    return dict(
        prefill_tokens_per_s=batch * prompt_len / prefill_s,
        prefill_s=prefill_s,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
        decode_ms_per_step=decode_s / (new_tokens - 1) * 1e3,
    )


def main(argv):
    del argv
    length = FLAGS.prompt_len + FLAGS.new_tokens
    sampler, model_config = random_sampler(FLAGS.config.model, length)
    model, params = sampler.model, sampler.params
    greedy = SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=0.0)
    rng = np.random.default_rng(0)
    result = dict(
        device_kind=jax.devices()[0].device_kind,
        num_devices=jax.device_count(),
        compute_dtype=model_config.dtype,
        prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens,
        kv_cache_bytes_per_token=cache_bytes_per_token(model_config),
        int8_kv_cache_bytes_per_token=cache_bytes_per_token(model_config, "int8"),
    )
    print(describe_machine())
    print(
        f"{jax.device_count()} x {result['device_kind']}, {model_config.dtype}; KV cache "
        f"{result['kv_cache_bytes_per_token']:,} bytes per token per sequence "
        f"(int8: {result['int8_kv_cache_bytes_per_token']:,})"
    )
    for batch in (int(b) for b in FLAGS.batch_sizes):
        rows = rng.integers(4, model_config.vocab_size, (batch, FLAGS.prompt_len)).tolist()
        for kv in FLAGS.kv_cache_dtypes:
            row = decode_speeds(sampler, rows, kv, FLAGS.new_tokens, FLAGS.repeats)
            result[f"batch{batch}" + ("_int8_kv" if kv == "int8" else "")] = row
            print(
                f"batch {batch:3d}, {kv:5s} KV cache: prefill "
                f"{row['prefill_tokens_per_s']:,.0f} tok/s ({row['prefill_s'] * 1e3:.1f} ms); "
                f"decode {row['decode_tokens_per_s']:,.1f} tok/s "
                f"({row['decode_ms_per_step']:.2f} ms/step)"
            )

    @jax.jit
    def uncached_next(params, window, last):
        logits = model.apply({"params": params}, window)
        return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], -1)

    def uncached_generate(prompt):
        window = jnp.zeros((1, length), jnp.int32).at[:, : FLAGS.prompt_len].set(prompt)
        for step in range(FLAGS.new_tokens):
            last = jnp.array([FLAGS.prompt_len + step - 1])
            token = uncached_next(params, window, last)
            window = window.at[0, FLAGS.prompt_len + step].set(token[0])
        return window

    prompt = jnp.asarray(rows[:1], jnp.int32)
    uncached_s = median_seconds(lambda: uncached_generate(prompt), FLAGS.repeats)
    cached_s = median_seconds(lambda: sampler.generate(rows[:1], greedy, eos_id=-1), FLAGS.repeats)
    result["batch1_uncached_s"] = uncached_s
    result["batch1_cached_s"] = cached_s
    result["cache_speedup"] = uncached_s / cached_s
    print(
        f"batch 1, {FLAGS.new_tokens} tokens after {FLAGS.prompt_len}: cached {cached_s:.3f} s, "
        f"uncached {uncached_s:.3f} s: {result['cache_speedup']:.1f}x faster with the cache"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
