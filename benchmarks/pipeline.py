"""Pipeline parallelism: step time, per-device memory and the bubble, by number of stages.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/pipeline.py
    XLA_FLAGS=--xla_force_host_platform_device_count=64 python benchmarks/pipeline.py \
        --part=llama_8b

`--part=stages` (8 devices): configs/default.py at --num_layers layers and a fixed global
batch, on meshes stage=S x data=8/S for S in --stages, pipelined with M = --microbatch_factor x S
microbatches (GPipe): the median step time of random batches and the per-device memory of the
compiled step (arguments + outputs - donated + temporaries, as `train.py --dry_run`), then the
bubble fraction of the schedule (from its valid-iteration mask) for M in {S, 2S, 4S, 8S}. On
simulated CPU devices the times are a correctness-scale figure: every "device" shares the same
cores, so a pipeline's idle stages cost nothing and its extra iterations cost in full.

`--part=llama_8b` (64 devices): configs/llama_8b.py compiled from shapes alone (nothing runs),
FSDP only (fsdp=64) against a stage axis (stage=S, fsdp=64/S) for S in --llama_stages.
Prints the machine, then Markdown tables, then one JSON line per row.
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
from errors import UserError  # noqa: E402
from model.pipeline import Schedule  # noqa: E402
from training.memory import breakdown  # noqa: E402
from training.trainer import Trainer, memory_report  # noqa: E402

config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs/default.py"), "Preset of --part=stages."
)
flags.DEFINE_enum("part", "stages", ["stages", "llama_8b"], "Which measurement (see above).")
flags.DEFINE_list("stages", ["1", "2", "4", "8"], "mesh.stage values of --part=stages.")
flags.DEFINE_integer("num_layers", 8, "Layers of --part=stages (a multiple of every stage).")
flags.DEFINE_integer("global_batch_size", 32, "Global batch of --part=stages, fixed.")
flags.DEFINE_integer("microbatch_factor", 2, "pipeline.microbatches = this x mesh.stage.")
flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
flags.DEFINE_list("llama_stages", ["4"], "mesh.stage values of --part=llama_8b (vs 1).")
flags.DEFINE_integer("llama_microbatches", 8, "pipeline.microbatches of --part=llama_8b.")
FLAGS = flags.FLAGS
GIB = 2**30


def staged(config, stages: int, microbatches: int):
    """`config` on stage=`stages` x fsdp or data = the rest, GPipe with `microbatches`."""
    config = copy.deepcopy(config)
    config.mesh.update(stage=stages)
    config.pipeline.update(schedule="gpipe", microbatches=microbatches)
    return config


def step_times(trainer, compiled, steps: int) -> list[float]:
    """Seconds of each of `steps` steps on one random batch, after --warmup untimed ones."""
    state = trainer.init_state()
    c = trainer.config
    batch = random_batch(c.train.global_batch_size, c.data.seq_len, c.model.vocab_size)
    batch = trainer.to_global(batch)
    times = []
    for _ in range(FLAGS.warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times[FLAGS.warmup :]


def measure(config, devices, steps: int) -> dict:
    """Per-device memory of the compiled step (GiB) and, with `steps`, its median time."""
    try:
        trainer = Trainer(config, devices)
        compiled, compile_s = trainer.compile()
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    report = {**memory_report(compiled), **breakdown(trainer, compiled)}
    row = dict(
        per_device_gib=report["per_device_bytes"] / GIB,
        params_gib=report["params_bytes"] / GIB,
        opt_state_gib=report["opt_state_bytes"] / GIB,
        temp_gib=report["temp_bytes"] / GIB,
        compile_s=compile_s,
    )
    if steps:
        row["step_s"] = statistics.median(step_times(trainer, compiled, steps))
    return row


def stages_part():
    devices = jax.devices()[:8]
    config = copy.deepcopy(FLAGS.config)
    config.model.num_layers = FLAGS.num_layers
    config.train.update(global_batch_size=FLAGS.global_batch_size, num_microbatches=1)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    print(
        f"{len(devices)} x {devices[0].device_kind}, configs/default.py at "
        f"{FLAGS.num_layers} layers, global batch {FLAGS.global_batch_size} x "
        f"{config.data.seq_len}, GPipe with M = {FLAGS.microbatch_factor} x S\n"
    )
    print("| S | mesh (stage x data) | M | bubble | step | per device | params | temporaries |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for s in map(int, FLAGS.stages):
        m = FLAGS.microbatch_factor * s
        measured = measure(staged(config, s, m), devices, FLAGS.steps)
        row = dict(stages=s, microbatches=m, **measured)
        row["bubble"] = Schedule(s, m).bubble_fraction if s > 1 else 0.0
        rows.append(row)
        print(
            f"| {s} | {s} x {8 // s} | {m if s > 1 else '-'} | {row['bubble']:.1%} "
            f"| {row['step_s'] * 1e3:.0f} ms | {row['per_device_gib'] * 1024:.1f} MiB "
            f"| {row['params_gib'] * 1024:.2f} MiB | {row['temp_gib'] * 1024:.1f} MiB |",
            flush=True,
        )
    print("\nBubble fraction (S-1)/(M+S-1), from the schedule's mask:\n")
    print("| S | M=S | M=2S | M=4S | M=8S |")
    print("|---|---|---|---|---|")
    for s in (2, 4, 8):
        bubbles = [Schedule(s, k * s).bubble_fraction for k in (1, 2, 4, 8)]
        print(f"| {s} | " + " | ".join(f"{b:.1%}" for b in bubbles) + " |")
        rows.append(dict(stages=s, bubbles=dict(zip(("S", "2S", "4S", "8S"), bubbles))))
    return rows


def llama_part():
    from configs.llama_8b import get_config

    devices = jax.devices()
    config = get_config()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    print(
        f"{len(devices)} x {devices[0].device_kind}, configs/llama_8b.py: global batch "
        f"{config.train.global_batch_size} x {config.data.seq_len}, compiled only\n"
    )
    print("| mesh | M | bubble | per device | params | optimizer state | temporaries |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for s in [1, *map(int, FLAGS.llama_stages)]:
        m = FLAGS.llama_microbatches
        row = dict(stages=s, microbatches=m, **measure(staged(config, s, m), devices, 0))
        row["bubble"] = Schedule(s, m).bubble_fraction if s > 1 else 0.0
        rows.append(row)
        mesh = f"stage={s} x fsdp={len(devices) // s}" if s > 1 else f"fsdp={len(devices)}"
        print(
            f"| {mesh} | {m if s > 1 else '-'} | {row['bubble']:.1%} "
            f"| {row['per_device_gib']:.2f} GiB | {row['params_gib']:.2f} GiB "
            f"| {row['opt_state_gib']:.2f} GiB | {row['temp_gib']:.2f} GiB |",
            flush=True,
        )
    return rows


def main(argv):
    del argv
    print(describe_machine())
    rows = stages_part() if FLAGS.part == "stages" else llama_part()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
