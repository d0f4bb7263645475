"""Attention alone: forward + backward time and temporaries of each implementation.

    python benchmarks/attention.py --lengths=1024,4096 --implementations=xla,blockwise \
        [--masks=causal,bidirectional,prefix] [--window=0,256]

One jitted `grad` of the attention output's projection on random weights (so the
forward and backward both run), with two packed documents per row and
grouped-query heads, on the first device; one row per (length, implementation,
mask, window). The prefix mask's prefix is the first half of each packed document;
a window > 0 is a local layer's sliding window (attend(..., window=)). Prints the
median time over --steps after one warm-up call and XLA's temporaries for the
compiled function, as a Markdown table, then one JSON line per row. The implementation
`jax.nn` (benchmark only) is jax.nn.dot_product_attention's XLA path on the same mask,
for comparison with meshlm's own `xla` einsums.
"""

import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from model.attention_ops import attend, attention_mask  # noqa: E402

flags.DEFINE_list("lengths", ["1024", "4096"], "Sequence lengths.")
flags.DEFINE_list("implementations", ["xla", "blockwise"], "attention implementations.")
flags.DEFINE_list("masks", ["causal"], "model.attention_mask kinds: causal,bidirectional,prefix.")
flags.DEFINE_list("window", ["0"], "Sliding windows, one row each (0 = a global layer).")
flags.DEFINE_integer("batch", 1, "Sequences.")
flags.DEFINE_integer("heads", 8, "Query heads.")
flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
flags.DEFINE_integer("head_dim", 64, "Head size.")
flags.DEFINE_integer("block_size", 512, "Blockwise/splash tile.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("steps", 5, "Timed calls (median reported).")
FLAGS = flags.FLAGS


def make_inputs(length: int):
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(FLAGS.dtype)
    shape = lambda heads: (FLAGS.batch, length, heads, FLAGS.head_dim)
    q, w = (jnp.asarray(rng.normal(size=shape(FLAGS.heads)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=shape(FLAGS.kv_heads)), dtype) for _ in range(2))
    split = length // 3  # two packed documents per row
    segments = np.where(np.arange(length) < split, 1, 2)
    # The prefix mask's prefix: the first half of each document.
    start = np.where(segments == 1, 0, split)
    half = np.where(segments == 1, split, length - split) // 2
    prefix = np.arange(length) - start < half
    rows = lambda x: jnp.asarray(np.tile(x, (FLAGS.batch, 1)))
    return q, k, v, w, rows(segments.astype(np.int32)), rows(prefix)


def measure(implementation: str, length: int, mask: str, window: int) -> dict:
    q, k, v, w, segments, prefix = make_inputs(length)
    prefixes = (prefix, prefix) if mask == "prefix" else (None, None)

    def loss(q, k, v):
        if implementation == "jax.nn":
            rule = attention_mask(segments, segments, length, length, 0, mask, *prefixes, window)
            out = jax.nn.dot_product_attention(q, k, v, mask=rule, implementation="xla")
        else:
            out = attend(
                q, k, v, segments, segments, 0, implementation, FLAGS.block_size, mask,
                *prefixes, window=window or None,
            )
        return jnp.sum(out.astype(jnp.float32) * w)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    return dict(
        implementation=implementation,
        length=length,
        mask=mask,
        window=window,
        fwd_bwd_ms=1e3 * statistics.median(times),
        temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
    )


def main(argv):
    del argv
    print(describe_machine())
    print(
        f"{jax.devices()[0].device_kind}; batch {FLAGS.batch}, heads {FLAGS.heads}/"
        f"{FLAGS.kv_heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}, block {FLAGS.block_size}\n"
    )
    print("| length | implementation | mask | window | forward + backward (median) | temporaries |")
    print("|---|---|---|---|---|---|")
    rows = []
    cases = itertools.product(
        map(int, FLAGS.lengths), FLAGS.implementations, FLAGS.masks, map(int, FLAGS.window)
    )
    for length, implementation, mask, window in cases:
        row = measure(implementation, length, mask, window)
        rows.append(row)
        print(
            f"| {length:,} | {implementation} | {mask} | {window or '-'} "
            f"| {row['fwd_bwd_ms']:.1f} ms | {row['temp_mib']:.1f} MiB |",
            flush=True,
        )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
