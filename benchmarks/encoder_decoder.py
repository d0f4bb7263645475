"""Train-step time of an encoder-decoder vs decoder-only models of about its size.

    python benchmarks/encoder_decoder.py [--enc_len=96] [--dec_len=32] [--batch=8]
        [--encoder_layers=2] [--decoder_layers=2] [--decoder_only_layers=4,7] [--steps=10]
        [--config=configs/default.py] [--config.model.<field>=...]

Every row is the real jitted train step (training/step.py through the Trainer: forward,
float32 loss, gradient and the AdamW update) of the config's width (configs/default.py:
embed 256, 4 heads, mlp 1024, vocab 8192, float32) on the first device, on random tokens.
Both kinds read the same text per row, enc_len + dec_len tokens (T5's 3:1 ratio by default):

    encoder-decoder  the encoder reads enc_len tokens (bidirectional), the decoder writes
                     dec_len (causal, cross-attending to the encoder); as span_corruption
    decoder-only     one row of enc_len + dec_len tokens, the first enc_len a bidirectional
                     prefix and the loss on the rest (prefix_lm, attention_mask=prefix)

The encoder-decoder has an embedding of its own and a cross-attention per decoder block, so
one decoder-only row per --decoder_only_layers depth brackets its parameter count (4 layers:
the same blocks; 7: about the same parameters). Prints the machine, a Markdown table, then
one JSON line per row: median step time over --steps after --warmup, text tokens/s
(batch x (enc_len + dec_len) / step), parameters, compile time and per-device memory
(--dry_run's bound: arguments + outputs - donated + temporaries).
"""

import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from data.batch import random_batch  # noqa: E402
from training.trainer import Trainer, memory_report  # noqa: E402

config_flags.DEFINE_config_file(
    "config",
    os.path.join(ROOT, "configs/default.py"),
    "Config of both models' width; depths, lengths, batch and objectives are set here.",
)
flags.DEFINE_integer("enc_len", 96, "Encoder tokens per row (the decoder-only's prefix).")
flags.DEFINE_integer("dec_len", 32, "Decoder tokens per row (the decoder-only's continuation).")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("encoder_layers", 2, "The encoder-decoder's encoder blocks.")
flags.DEFINE_integer("decoder_layers", 2, "The encoder-decoder's decoder blocks.")
flags.DEFINE_list("decoder_only_layers", ["4", "7"], "Decoder-only depths, one row each.")
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
FLAGS = flags.FLAGS


def encoder_decoder_case(base):
    """(config, batch) of the encoder-decoder: enc_len encoder and dec_len decoder tokens."""
    config = copy.deepcopy(base)
    config.model.update(
        num_layers=FLAGS.decoder_layers, encoder_layers=FLAGS.encoder_layers,
        attention_mask="causal",
    )
    config.data.update(seq_len=FLAGS.dec_len, encoder_seq_len=FLAGS.enc_len)
    config.train.update(objective="span_corruption", global_batch_size=FLAGS.batch)
    batch = random_batch(
        FLAGS.batch, FLAGS.dec_len, config.model.vocab_size, packed=False,
        encoder_seq_len=FLAGS.enc_len,
    )
    return config, batch


def decoder_only_case(base, layers: int):
    """(config, batch) of a decoder-only prefix LM over the same enc_len + dec_len tokens."""
    config = copy.deepcopy(base)
    config.model.update(num_layers=layers, encoder_layers=0, attention_mask="prefix")
    config.data.update(seq_len=FLAGS.enc_len + FLAGS.dec_len, encoder_seq_len=0)
    config.train.update(objective="prefix_lm", global_batch_size=FLAGS.batch)
    batch = random_batch(FLAGS.batch, FLAGS.enc_len + FLAGS.dec_len, config.model.vocab_size,
                         packed=False)
    batch["prefix_mask"][:, : FLAGS.enc_len] = 1
    batch["weights"][:, : FLAGS.enc_len - 1] = 0.0  # loss on the continuation only
    return config, batch


def measure(name: str, config, host_batch) -> dict:
    """The median step time of the config's real train step on the first device."""
    trainer = Trainer(config, devices=jax.devices()[:1])
    compiled, compile_s = trainer.compile()
    state, batch = trainer.init_state(), trainer.to_global(host_batch)
    times = []
    for i in range(FLAGS.warmup + FLAGS.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    model = config.model
    return dict(
        model=name,
        encoder_layers=model.encoder_layers,
        decoder_layers=model.num_layers,
        params=trainer.num_params,
        enc_len=FLAGS.enc_len if model.encoder_layers else 0,
        dec_len=config.data.seq_len,
        batch=FLAGS.batch,
        dtype=model.dtype,
        steps=FLAGS.steps,
        step_s=step_s,
        tokens_per_s=FLAGS.batch * (FLAGS.enc_len + FLAGS.dec_len) / step_s,
        compile_s=compile_s,
        per_device_bytes=memory_report(compiled).get("per_device_bytes"),
        load_average=os.getloadavg()[0],
    )


def main(argv):
    del argv
    print(describe_machine())
    cases = [("encoder-decoder", *encoder_decoder_case(FLAGS.config))]
    for layers in map(int, FLAGS.decoder_only_layers):
        cases.append(("decoder-only", *decoder_only_case(FLAGS.config, layers)))
    rows = [measure(*case) for case in cases]
    reference = rows[0]["params"]
    print(
        f"\n{jax.devices()[0].device_kind}; batch {FLAGS.batch}, {FLAGS.enc_len} + "
        f"{FLAGS.dec_len} tokens per row, median of {FLAGS.steps} steps after {FLAGS.warmup}\n"
    )
    print("| model | layers | params | vs enc-dec | step (median) | text tokens/s | per device |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        layers = f"{row['decoder_layers']}"
        if row["encoder_layers"]:
            layers = f"{row['encoder_layers']} enc + {row['decoder_layers']} dec"
        memory = (row["per_device_bytes"] or 0) / 2**20
        print(
            f"| {row['model']} | {layers} | {row['params']:,} | {row['params'] - reference:+,} "
            f"| {1e3 * row['step_s']:.1f} ms | {row['tokens_per_s']:,.0f} | {memory:.1f} MiB |"
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
