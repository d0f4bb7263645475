"""One accelerator benchmark: train step and decoding of gpt2_small and llama_1b on one device.

    python benchmarks/accelerator.py                  # one NVIDIA GPU: < 8 minutes
    python benchmarks/accelerator.py --cpu_smoke      # tiny shapes on CPU, seconds (the suite)
        [--models=gpt2_small,llama_1b] [--attention=xla,blockwise,cudnn]
        [--decode_models=llama_1b] [--decode_variants=none:model,int8:int8,...] [--steps=10]
        [--output=accelerator.json]

Train (bf16, the config's remat): for each model and attention implementation (cudnn only
on NVIDIA GPUs), the largest batch that fits one device: the step is compiled at a probe
batch, its memory estimate (`--dry_run`'s, training.trainer.memory_report) split into
state and per-row bytes, the largest power of two whose estimate is under 90% of the
device's memory is compiled, and halved until it fits. Then step time, tokens/s, MFU
(training.hardware's peak), compile time, and the measured peak memory next to the
estimate (benchmarks/train_step.py's `measure`).

Decode (benchmarks/decode.py's `decode_speeds`): tokens/s at batch 1 and 32 after a
512-token prompt, for bf16 and int8 weights (model.quantization=int8) with the model's and
the int8 KV cache.

On an accelerator each measurement runs in its own process, so that its peak memory is its
own and one that fails (out of memory, an implementation the device lacks) is a row with
its error. Prints one table; writes every number as JSON (--output).
"""

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import decode, train_step  # noqa: E402
from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from training.memory import device_memory_bytes  # noqa: E402
from training.trainer import Trainer, memory_report  # noqa: E402

FIT_FRACTION = 0.9  # of a device's memory that the estimate may fill (fragmentation, slack)
SMOKE_MODEL = dict(  # --cpu_smoke: every model shrunk to this, so the script runs in seconds
    num_layers=1, embed_dim=64, num_heads=4, mlp_dim=128, vocab_size=512, max_seq_len=64,
    attention_block_size=16, loss_chunk_size=16,
)


def model_config(name: str, smoke: bool):
    """configs/<name>.py in bf16 with one microbatch (tiny with `smoke`)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.dtype = "bfloat16"
    config.train.num_microbatches = 1
    if smoke:
        config.model.update(SMOKE_MODEL)
        if config.model.num_kv_heads:
            config.model.num_kv_heads = 2
        config.data.seq_len = 32
    return config


def compiled_at(config, batch: int):
    """(trainer, compiled step, compile seconds, memory report) at global batch `batch`."""
    config = copy.deepcopy(config)
    config.train.global_batch_size = batch
    trainer = Trainer(config, devices=jax.devices()[:1])
    compiled, seconds = trainer.compile()
    return trainer, compiled, seconds, memory_report(compiled)


def largest_batch_step(config, probe: int, max_batch: int):
    """compiled_at() for the largest power-of-two batch whose estimate fits one device."""
    available = FIT_FRACTION * (device_memory_bytes(jax.devices()[0]) or float("inf"))
    at_probe = compiled_at(config, probe)
    state_bytes = at_probe[3].get("argument_bytes", 0)
    row_bytes = max(at_probe[3].get("per_device_bytes", 0) - state_bytes, 1) / probe
    batch = probe
    while batch * 2 <= max_batch and state_bytes + batch * 2 * row_bytes <= available:
        batch *= 2
    while batch > probe:
        found = compiled_at(config, batch)
        if found[3].get("per_device_bytes", 0) <= available:
            return found
        batch //= 2
    return at_probe


def train_row(name: str, attention: str, args) -> dict:
    config = model_config(name, args.cpu_smoke)
    config.model.attention_implementation = attention
    trainer, compiled, compile_s, memory = largest_batch_step(config, args.probe, args.max_batch)
    result = train_step.measure(
        trainer, compiled, compile_s, steps=args.steps, warmup=2, peak_flops=args.peak_flops
    )
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        result,
        batch=trainer.config.train.global_batch_size,
        seq_len=trainer.config.data.seq_len,
        estimate_bytes=memory.get("per_device_bytes"),
        measured_peak_bytes=stats.get("peak_bytes_in_use"),
    )


def decode_rows(name: str, args) -> list[dict]:
    """A row per batch size and --decode_variants entry (<weights>:<KV cache dtype>)."""
    config = model_config(name, args.cpu_smoke)
    rng = np.random.default_rng(0)
    rows = []
    variants = [v.split(":") for v in args.decode_variants.split(",")]
    for quantization in dict.fromkeys(weights for weights, _ in variants):
        config.model.quantization = quantization
        sampler, _ = decode.random_sampler(config.model, args.prompt_len + args.new_tokens)
        for batch in args.decode_batches:
            prompts = rng.integers(4, config.model.vocab_size, (batch, args.prompt_len)).tolist()
            for kv in (kv for weights, kv in variants if weights == quantization):
                speeds = decode.decode_speeds(sampler, prompts, kv, args.new_tokens, repeats=2)
                rows.append(dict(speeds, weights=quantization, kv_cache=kv, batch=batch))
        del sampler
    return rows


def run_task(task: str, args):
    """One measurement (`train:<model>:<attention>` or `decode:<model>`): in this process
    with --cpu_smoke or --only, else in a child process of this script (its own memory)."""
    kind, name, *rest = task.split(":")
    if args.cpu_smoke or args.only:
        return train_row(name, rest[0], args) if kind == "train" else decode_rows(name, args)
    command = [sys.executable, os.path.abspath(__file__), f"--only={task}", *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]
        return {"error": last[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_implementations(wanted: list[str]) -> list[str]:
    """cudnn is NVIDIA's: left out on other devices."""
    gpu = jax.devices()[0].platform == "gpu"
    return [a for a in wanted if a != "cudnn" or gpu]


def table(results: dict) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    lines = [
        f"{'train':30s} {'batch':>5s} {'step ms':>8s} {'tok/s':>10s} {'MFU':>6s} "
        f"{'compile s':>9s} {'est GiB':>8s} {'peak GiB':>8s}"
    ]
    for task, row in results["train"].items():
        if "error" in row:
            lines.append(f"{task:30s} error: {row['error']}")
            continue
        lines.append(
            f"{task:30s} {row['batch']:5d} {row['step_s'] * 1e3:8.1f} "
            f"{row['tokens_per_s']:10,.0f} {100 * row['mfu']:5.1f}% {row['compile_s']:9.1f} "
            f"{gib(row['estimate_bytes']):>8s} {gib(row['measured_peak_bytes']):>8s}"
        )
    lines.append(f"{'decode':30s} {'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for task, rows in results["decode"].items():
        if isinstance(rows, dict):  # an error
            lines.append(f"{task:30s} error: {rows['error']}")
            continue
        for row in rows:
            label = f"{task} {row['weights']} weights, {row['kv_cache']} KV"
            lines.append(
                f"{label:30s} {row['batch']:5d} {row['prefill_tokens_per_s']:14,.0f} "
                f"{row['decode_tokens_per_s']:13,.1f}"
            )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny shapes, in seconds")
    parser.add_argument("--models", default="gpt2_small,llama_1b")
    parser.add_argument("--attention", default="xla,blockwise,cudnn")
    parser.add_argument("--decode_models", default="llama_1b")
    parser.add_argument(
        "--decode_variants",
        default="none:model,none:int8,int8:model,int8:int8",
        help="<weights: none|int8>:<KV cache: model|int8>, comma-separated",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (median)")
    parser.add_argument("--output", default="accelerator.json")
    parser.add_argument("--only", default="", help="(internal) one task, printed as JSON")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.probe, args.max_batch = (1, 2) if smoke else (4, 512)
    args.prompt_len, args.new_tokens = (8, 4) if smoke else (512, 64)
    args.decode_batches = (1,) if smoke else (1, 32)
    # --cpu_smoke: MFU against a nominal 1 TFLOP/s, not a measured CPU peak (seconds saved)
    args.peak_flops = 1e12 if smoke else 0.0
    if smoke:
        args.steps = min(args.steps, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.only:
        print(json.dumps(run_task(args.only, args)))
        return
    start = time.perf_counter()
    results = {"machine": describe_machine(), "device": jax.devices()[0].device_kind}
    print(results["machine"], "|", results["device"], flush=True)
    attention = attention_implementations(args.attention.split(","))
    tasks = [f"train:{m}:{a}" for m in args.models.split(",") for a in attention]
    decodes = [f"decode:{m}" for m in args.decode_models.split(",") if m]
    results["train"], results["decode"] = {}, {}
    for task in tasks + decodes:
        kind, name = task.split(":", 1)
        task_start = time.perf_counter()
        results[kind][name] = run_task(task, args)
        print(f"{task}: {time.perf_counter() - task_start:.0f} s", file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - start
    print("\n".join(table(results)))
    print(f"{results['seconds']:.0f} s in all; every number: {args.output}")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
