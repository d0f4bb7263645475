"""Attention alone: forward + backward time and temporaries of each implementation.

    python benchmarks/attention.py --lengths=1024,4096 --implementations=xla,blockwise

One jitted `grad` of the attention output's projection on random weights (so the
forward and backward both run), with two packed documents per row and
grouped-query heads, on the first device. Prints the median time over --steps
after one warm-up call and XLA's temporaries for the compiled function, as a
Markdown table, then one JSON line per row.
"""

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
from model.attention_ops import attend  # noqa: E402

flags.DEFINE_list("lengths", ["1024", "4096"], "Sequence lengths.")
flags.DEFINE_list("implementations", ["xla", "blockwise"], "attention implementations.")
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
    segments = np.ones((FLAGS.batch, length), np.int32)
    segments[:, length // 3 :] = 2  # two packed documents per row
    return q, k, v, w, jnp.asarray(segments)


def measure(implementation: str, length: int) -> dict:
    q, k, v, w, segments = make_inputs(length)

    def loss(q, k, v):
        out = attend(q, k, v, segments, segments, 0, implementation, FLAGS.block_size)
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
    print("| length | implementation | forward + backward (median) | temporaries |")
    print("|---|---|---|---|")
    rows = []
    for length in map(int, FLAGS.lengths):
        for implementation in FLAGS.implementations:
            row = measure(implementation, length)
            rows.append(row)
            print(
                f"| {length:,} | {implementation} | {row['fwd_bwd_ms']:.1f} ms "
                f"| {row['temp_mib']:.1f} MiB |",
                flush=True,
            )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
