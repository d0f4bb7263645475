"""Train-step benchmark: parameters, FLOPs/token, compile time, step time, tokens/s, MFU.

    python benchmarks/train_step.py --config=configs/default.py [--steps=20] [--warmup=3]
        [--config.model.dtype=bfloat16] [--config.model.scan_unroll=1] [--compare_depth]
        [--compile_only]

Runs on the real devices (all of them, on the config's mesh) with random token batches of
the config's shape. MFU is measured against a table of bf16 dense peaks per chip; on CPU or
an unknown chip the peak is measured with a large jitted matmul in the model's compute dtype.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from model import Transformer  # noqa: E402
from model.flops import train_flops_per_token  # noqa: E402
from sharding import activate, batch_sharding, logical_rules, make_mesh  # noqa: E402
from training.config import tokens_per_step, validate_config  # noqa: E402
from training.optimizer import make_optimizer  # noqa: E402
from training.state import init_train_state, state_shardings  # noqa: E402
from training.step import BATCH_KEYS, make_train_step  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/default.py"),
                                "Config file; any field can be overridden (--config.model.dtype=...).")
flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_bool("compare_depth", False, "Also compile 4 vs 48 layers of the same width.")
flags.DEFINE_bool("compile_only", False, "Only compile (abstract inputs): no state, no steps.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU; 0 = table or measured.")
FLAGS = flags.FLAGS

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), matched on device_kind.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def measure_matmul_peak(dtype, n=2048, repeats=10) -> float:
  """FLOP/s of a jitted n x n matmul on device 0 (median of `repeats`)."""
  a = jax.device_put(jnp.ones((n, n), dtype), jax.devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times)


def peak_flops_per_device(dtype) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained)."""
  kind = jax.devices()[0].device_kind
  if FLAGS.peak_flops > 0:
    return FLAGS.peak_flops, f"--peak_flops (device_kind={kind!r})"
  # Longest name first, so "TPU v5 lite" wins over "TPU v5".
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_BF16_FLOPS[name], f"table: {name} bf16 dense (device_kind={kind!r})"
  peak = measure_matmul_peak(dtype)
  return peak, f"measured: jitted 2048x2048 {jnp.dtype(dtype).name} matmul, median of 10 (device_kind={kind!r})"


def build(config):
  """Model config, mesh, rules, abstract state, its shardings and the train step, from `config`."""
  model_config = validate_config(config, jax.device_count(), jax.process_count())
  model = Transformer(model_config)
  mesh, rules = make_mesh(config.mesh), logical_rules(config.sharding_rules)
  tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  abstract, shardings = state_shardings(model, tx, mesh, rules, config.data.seq_len)
  step = make_train_step(model, tx, schedule, mesh, rules, shardings,
                         num_microbatches=config.train.num_microbatches,
                         z_loss_weight=config.train.z_loss_weight, seed=config.seed)
  return model_config, model, tx, mesh, rules, abstract, shardings, step


def compile_step(config):
  """Lowers and compiles the train step on abstract inputs; returns (parts, compiled, seconds)."""
  parts = build(config)
  _, _, _, mesh, rules, abstract, shardings, step = parts
  batch_spec = jax.ShapeDtypeStruct((config.train.global_batch_size, config.data.seq_len),
                                    jnp.int32, sharding=batch_sharding(mesh, rules))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, shardings)
  batch = {key: batch_spec for key in BATCH_KEYS}
  batch["weights"] = batch_spec.update(dtype=jnp.float32)
  start = time.perf_counter()
  with activate(mesh, rules):
    compiled = step.jitted.lower(abstract_state, batch).compile()
  return parts, compiled, time.perf_counter() - start


def random_batch(config, mesh, rules, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  b, t = config.train.global_batch_size, config.data.seq_len
  tokens = rng.integers(1, config.model.vocab_size, (b, t + 1), dtype=np.int32)
  host = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((b, t), np.int32),
              positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
              weights=np.ones((b, t), np.float32))
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}


def peak_memory_bytes(compiled) -> tuple[int | None, str]:
  """(per-device bytes, how) from XLA's memory analysis; (None, ...) where there is none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None, "no memory analysis on this backend"
  if getattr(stats, "peak_memory_in_bytes", 0):
    return int(stats.peak_memory_in_bytes), "XLA peak_memory_in_bytes"
  return (int(stats.argument_size_in_bytes + stats.output_size_in_bytes
              - stats.alias_size_in_bytes + stats.temp_size_in_bytes),
          "arguments + outputs - donated aliases + temporaries")


def depth_compile_times(config, depths=(4, 48)) -> dict:
  times = {}
  for depth in depths:
    deep = copy.deepcopy(config)
    deep.model.update(num_layers=depth, scan_unroll=1)  # unrolling would compile every layer
    times[depth] = compile_step(deep)[2]
  return times


def main(argv):
  del argv
  config = FLAGS.config
  (model_config, model, tx, mesh, rules, abstract, _, _), compiled, compile_s = compile_step(config)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  flops_per_token = train_flops_per_token(model_config, abstract.params, config.data.seq_len)
  tokens = tokens_per_step(config)
  memory, memory_source = peak_memory_bytes(compiled)
  result = dict(device_kind=jax.devices()[0].device_kind, num_devices=jax.device_count(),
                mesh=dict(zip(mesh.axis_names, mesh.devices.shape)), params=n_params,
                flops_per_token=flops_per_token, tokens_per_step=tokens,
                compute_dtype=model_config.dtype, num_layers=model_config.num_layers,
                scan_unroll=model_config.scan_unroll, remat_policy=model_config.remat_policy,
                compile_s=compile_s, peak_memory_bytes_per_device=memory,
                peak_memory_source=memory_source, load_average=os.getloadavg()[0])
  print(f"device: {jax.device_count()} x {result['device_kind']}  mesh={result['mesh']}"
        f"  (host load average {result['load_average']:.2f}: other work skews CPU timings)")
  print(f"params: {n_params:,} ({n_params / 1e6:.2f}M)   train FLOPs/token: {flops_per_token:.4g}")
  print(f"batch: {config.train.global_batch_size} x {config.data.seq_len} = {tokens:,} tokens/step"
        f"   dtype={model_config.dtype}  scan_unroll={model_config.scan_unroll}"
        f"  remat={model_config.remat_policy}")
  print(f"compile (lower + compile): {compile_s:.2f} s")
  if memory is not None:
    print(f"peak memory per device: {memory / 2**20:.1f} MiB ({memory_source})")

  if not FLAGS.compile_only:
    state = init_train_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    batch = random_batch(config, mesh, rules, config.seed)
    times = []
    for i in range(FLAGS.warmup + FLAGS.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= FLAGS.warmup:
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak, peak_source = peak_flops_per_device(model_config.compute_dtype)
    tokens_per_s = tokens / step_s
    mfu = tokens_per_s * flops_per_token / (peak * jax.device_count())
    result.update(step_s=step_s, step_s_min=min(times), step_s_max=max(times),
                  tokens_per_s=tokens_per_s, model_flops_per_s=tokens_per_s * flops_per_token,
                  peak_flops_per_device=peak, peak_source=peak_source, mfu=mfu,
                  final_loss=float(metrics["loss"]))
    print(f"step time: median {step_s * 1e3:.1f} ms over {FLAGS.steps} steps "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}; {FLAGS.warmup} warm-up)")
    print(f"throughput: {tokens_per_s:,.0f} tokens/s   "
          f"{tokens_per_s * flops_per_token / 1e9:.2f} model GFLOP/s")
    print(f"MFU: {100 * mfu:.1f}% of {peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

  if FLAGS.compare_depth:
    depth = depth_compile_times(config)
    result["compile_s_by_depth"] = depth
    print("compile time by depth (scan_unroll=1): "
          + ", ".join(f"{d} layers {s:.2f} s" for d, s in depth.items())
          + f"  -> ratio {depth[48] / depth[4]:.2f}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
