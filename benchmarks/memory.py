"""Per-device memory of the train step by --dry_run, across attention and loss implementations.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory.py \
        --config=configs/llama_1b.py --seq_lens=2048,8192,32768 \
        --attention=xla,blockwise --loss_chunk_sizes=0,256

For each sequence length the global batch is `tokens_per_step // seq_len`
(default: the preset's own tokens per step), so every row trains on the same
tokens and only the length, the attention and the loss change. Each row compiles
the real train step from abstract inputs (nothing is allocated), exactly like
`train.py --dry_run`, on all the devices JAX sees. cudnn and splash compile only
on their accelerators. Prints a Markdown table, then one JSON line per row.
"""

import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from errors import UserError  # noqa: E402
from training.trainer import Trainer  # noqa: E402

config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs/llama_1b.py"), "Preset; fields may be overridden."
)
flags.DEFINE_list("seq_lens", ["2048"], "Sequence lengths to compile.")
flags.DEFINE_list("attention", ["xla", "blockwise"], "model.attention_implementation values.")
flags.DEFINE_list("loss_chunk_sizes", ["0", "256"], "model.loss_chunk_size values (0 = full).")
flags.DEFINE_integer("tokens_per_step", 0, "Global tokens per step; 0 = the preset's.")
FLAGS = flags.FLAGS


def variant(config, seq_len: int, attention: str, loss_chunk_size: int, tokens: int):
    config = copy.deepcopy(config)
    config.data.seq_len = seq_len
    config.model.update(
        max_seq_len=max(seq_len, config.model.max_seq_len),
        attention_implementation=attention,
        loss_chunk_size=loss_chunk_size,
    )
    config.train.update(global_batch_size=tokens // seq_len, num_microbatches=1)
    return config


def main(argv):
    del argv
    config = FLAGS.config
    tokens = FLAGS.tokens_per_step or config.train.global_batch_size * config.data.seq_len
    print(describe_machine())
    print(
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, {tokens:,} tokens per step, "
        f"num_microbatches=1, mesh {config.mesh.to_dict()}\n"
    )
    print("| seq_len | batch | attention | loss_chunk_size | per device | temporaries | compile |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for seq_len in map(int, FLAGS.seq_lens):
        for attention in FLAGS.attention:
            for chunk in map(int, FLAGS.loss_chunk_sizes):
                cfg = variant(config, seq_len, attention, chunk, tokens)
                try:
                    report = Trainer(cfg).dry_run()
                except UserError as error:
                    raise SystemExit(f"error: {error}") from None
                row = dict(
                    seq_len=seq_len,
                    global_batch_size=cfg.train.global_batch_size,
                    attention=attention,
                    loss_chunk_size=chunk,
                    per_device_gib=report["per_device_bytes"] / 2**30,
                    temp_gib=report["temp_bytes"] / 2**30,
                    compile_s=report["compile_seconds"],
                )
                rows.append(row)
                print(
                    f"| {seq_len:,} | {row['global_batch_size']} | {attention} | {chunk or 'full'} "
                    f"| {row['per_device_gib']:.1f} GiB | {row['temp_gib']:.1f} GiB "
                    f"| {row['compile_s']:.1f} s |",
                    flush=True,
                )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
