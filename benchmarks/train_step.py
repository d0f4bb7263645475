"""Train-step benchmark: parameters, FLOPs/token, compile time, step time, tokens/s, MFU.

    python benchmarks/train_step.py --config=configs/default.py [--steps=20] [--warmup=3]
        [--config.model.dtype=bfloat16] [--config.model.scan_unroll=1] [--compare_depth]
        [--compile_only]

Runs on the real devices (all of them, on the config's mesh) with random token batches of
the config's shape. MFU is measured against a table of bf16 dense peaks per chip; on CPU or
an unknown chip the peak is measured with a large jitted matmul in the model's compute dtype.
MFU is printed in two conventions: PaLM's (causal attention counted in full; JSON `mfu`, the
one train.py logs) and MaxText's (causal attention halved; JSON `mfu_causal_halved`).
`--compare_depth` compiles the same width at 4 and 48 layers (scan_unroll=1): with nn.scan
the compile time should barely grow. Prints readable lines, then one JSON line with every number.
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

import startup  # noqa: E402
from benchmarks.machine_info import cpu_model, describe as describe_machine  # noqa: E402
from data import batch as data_batch  # noqa: E402
from errors import UserError  # noqa: E402
from model.flops import train_flops_per_token  # noqa: E402
from training.config import tokens_per_step  # noqa: E402
from training.hardware import peak_flops_per_device  # noqa: E402
from training.trainer import Trainer, memory_report  # noqa: E402

config_flags.DEFINE_config_file(
    "config",
    os.path.join(ROOT, "configs/default.py"),
    "Config file; any field can be overridden (--config.model.dtype=...).",
)
flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_bool("compare_depth", False, "Also compile 4 vs 48 layers of the same width.")
flags.DEFINE_bool("compile_only", False, "Only compile (abstract inputs): no state, no steps.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU; 0 = table or measured.")
FLAGS = flags.FLAGS


def random_batch(trainer, seed=0) -> dict:
    """Random tokens of the config's global batch shape, one document per row."""
    config = trainer.config
    host = data_batch.random_batch(
        config.train.global_batch_size,
        config.data.seq_len,
        config.model.vocab_size,
        seed,
        packed=False,
    )
    return trainer.to_global(host)


def depth_compile_times(config, depths=(4, 48)) -> dict:
    times = {}
    for depth in depths:
        deep = copy.deepcopy(config)
        deep.model.update(num_layers=depth, scan_unroll=1)  # unrolling would compile every layer
        times[depth] = Trainer(deep).compile()[1]
    return times


def time_steps(trainer, compiled, warmup: int, steps: int) -> list[float]:
    state = trainer.init_state()
    batch = random_batch(trainer, trainer.config.seed)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(trainer, compiled, compile_s: float, *, steps: int, warmup: int, peak_flops=0.0):
    """Every number of the benchmark for a compiled step as a dict (JSON); `steps` = 0
    only compiles. `peak_flops` > 0 replaces the table's or measured peak for MFU."""
    config, model_config = trainer.config, trainer.model_config
    memory = memory_report(compiled)
    tokens = tokens_per_step(config)
    # PaLM counts causal attention in full (train.py logs this one); MaxText halves it.
    causal_flops = train_flops_per_token(
        model_config,
        trainer.abstract_model_params,
        config.data.seq_len,
        causal_discount=True,
        adapters=trainer.abstract_state.params["lora"] if trainer.lora else None,
    )
    result = dict(
        device_kind=jax.devices()[0].device_kind,
        num_devices=jax.device_count(),
        mesh=dict(zip(trainer.mesh.axis_names, trainer.mesh.devices.shape)),
        params=trainer.num_params,
        flops_per_token=trainer.flops_per_token,
        flops_per_token_causal_halved=causal_flops,
        tokens_per_step=tokens,
        compute_dtype=model_config.dtype,
        num_layers=model_config.num_layers,
        scan_unroll=model_config.scan_unroll,
        remat_policy=model_config.remat_policy,
        compile_s=compile_s,
        peak_memory_bytes_per_device=memory.get("per_device_bytes"),
        load_average=os.getloadavg()[0],
        cpu_model=cpu_model(),
    )
    if not steps:
        return result
    times = time_steps(trainer, compiled, warmup, steps)
    step_s = statistics.median(times)
    if peak_flops > 0:
        peak, peak_source = peak_flops, "--peak_flops"
    else:
        peak, peak_source = peak_flops_per_device(model_config.dtype)
    tokens_per_s = tokens / step_s
    result.update(
        steps=steps,
        warmup=warmup,
        step_s=step_s,
        step_s_min=min(times),
        step_s_max=max(times),
        tokens_per_s=tokens_per_s,
        model_flops_per_s=tokens_per_s * trainer.flops_per_token,
        peak_flops_per_device=peak,
        peak_source=peak_source,
        mfu=tokens_per_s * trainer.flops_per_token / (peak * jax.device_count()),
        mfu_causal_halved=tokens_per_s * causal_flops / (peak * jax.device_count()),
    )
    return result


def main(argv):
    del argv
    startup.reuse_freed_memory()  # as every meshlm command does
    config = FLAGS.config
    try:
        trainer = Trainer(config)
    except UserError as error:  # a bad --config value: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    model_config = trainer.model_config
    compiled, compile_s = trainer.compile()
    steps = 0 if FLAGS.compile_only else FLAGS.steps
    result = measure(
        trainer, compiled, compile_s, steps=steps, warmup=FLAGS.warmup, peak_flops=FLAGS.peak_flops
    )
    tokens, causal_flops = result["tokens_per_step"], result["flops_per_token_causal_halved"]
    print(describe_machine())
    print(
        f"device: {jax.device_count()} x {result['device_kind']}  mesh={result['mesh']}"
        f"  (host load average {result['load_average']:.2f}: other work skews CPU timings)"
    )
    print(
        f"params: {trainer.num_params:,} ({trainer.num_params / 1e6:.2f}M)"
        f"   train FLOPs/token: {trainer.flops_per_token:.4g} (PaLM: causal attention in full),"
        f" {causal_flops:.4g} (MaxText: causal attention halved)"
    )
    print(
        f"batch: {config.train.global_batch_size} x {config.data.seq_len} = {tokens:,} tokens/step"
        f"   dtype={model_config.dtype}  scan_unroll={model_config.scan_unroll}"
        f"  remat={model_config.remat_policy}"
    )
    print(f"compile (lower + compile): {compile_s:.2f} s")
    if result["peak_memory_bytes_per_device"]:
        print(f"peak memory per device: {result['peak_memory_bytes_per_device'] / 2**20:.1f} MiB")
    if steps:
        step_s, times = result["step_s"], (result["step_s_min"], result["step_s_max"])
        print(
            f"step time: median {step_s * 1e3:.1f} ms over {steps} steps "
            f"(min {times[0] * 1e3:.1f}, max {times[1] * 1e3:.1f}; {FLAGS.warmup} warm-up)"
        )
        print(
            f"throughput: {result['tokens_per_s']:,.0f} tokens/s   "
            f"{result['model_flops_per_s'] / 1e9:.2f} model GFLOP/s"
        )
        print(
            f"MFU: {100 * result['mfu']:.1f}% (PaLM: causal attention counted in full), "
            f"{100 * result['mfu_causal_halved']:.1f}% (MaxText: causal attention halved), "
            f"of {result['peak_flops_per_device'] / 1e12:.3f} TFLOP/s per device "
            f"({result['peak_source']})"
        )

    if FLAGS.compare_depth:
        depth = depth_compile_times(config)
        result["compile_s_by_depth"] = depth
        print(
            "compile time by depth (scan_unroll=1): "
            + ", ".join(f"{d} layers {s:.2f} s" for d, s in depth.items())
            + f"  -> ratio {depth[48] / depth[4]:.2f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
