"""Full fine-tuning vs LoRA on one config: trainable params, per-device bytes, step time.

    python benchmarks/finetune.py --config=configs/default.py --lora_ranks=0,8 \
        [--lora_targets=query,key,value,out,mlp] [--steps=20] [--warmup=3] [--compile_only]

Rank 0 is full fine-tuning. Bytes come from the compiled step (as `train.py --dry_run`):
parameters and optimizer state per device, and the step's whole per-device estimate; the
checkpoint column is the arrays each step checkpoint writes (all devices together; LoRA:
adapters and their optimizer state, the base being written once per workdir,
checkpoints/lora.py). Step times use random batches of the config's shape on all
devices JAX sees (flags --config, --steps, --warmup, --compile_only are
benchmarks/train_step.py's). Prints a Markdown table, then JSON lines.
"""

import copy
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from benchmarks.train_step import FLAGS, time_steps  # noqa: E402  (--config, --steps, --warmup, --compile_only)
from checkpoints.lora import stored  # noqa: E402
from errors import UserError  # noqa: E402
from training.trainer import Trainer  # noqa: E402

flags.DEFINE_list("lora_ranks", ["0", "8"], "lora.rank values; 0 = full fine-tuning.")
flags.DEFINE_string("lora_targets", "query,key,value,out,mlp", "lora.targets for rank > 0.")

MIB = 2**20


def array_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(config, rank: int) -> dict:
    config = copy.deepcopy(config)
    config.lora.update(rank=rank, targets=FLAGS.lora_targets)
    try:
        trainer = Trainer(config)
        report = trainer.dry_run()
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    row = dict(
        lora_rank=rank,
        trainable_params=report["num_trainable_params"],
        params_mib=report["params_bytes"] / MIB,
        opt_state_mib=report["opt_state_bytes"] / MIB,
        per_device_mib=report["per_device_bytes"] / MIB,
        temp_mib=report["temp_bytes"] / MIB,
        checkpoint_mib=array_bytes(
            (stored(trainer.abstract_state.params), trainer.abstract_state.opt_state)
        )
        / MIB,
    )
    if not FLAGS.compile_only:
        compiled, _ = trainer.compile()
        row["step_ms"] = 1000 * statistics.median(time_steps(trainer, compiled, FLAGS.warmup, FLAGS.steps))
    return row


def main(argv):
    del argv
    config = FLAGS.config
    print(describe_machine())
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {config.mesh.to_dict()}")
    print(
        "| lora.rank | trainable params | params | optimizer state | temporaries | per device "
        "| checkpoint per step | step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [measure(config, int(rank)) for rank in FLAGS.lora_ranks]
    for r in rows:
        step = f"{r['step_ms']:.0f} ms" if "step_ms" in r else "-"
        print(
            f"| {r['lora_rank']} | {r['trainable_params']:,} | {r['params_mib']:.1f} MiB | "
            f"{r['opt_state_mib']:.1f} MiB | {r['temp_mib']:.1f} MiB | "
            f"{r['per_device_mib']:.1f} MiB | {r['checkpoint_mib']:.1f} MiB | {step} |"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    app.run(main)
