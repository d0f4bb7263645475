"""Compression benchmark: what each method costs in perplexity and what it saves.

    python benchmarks/compress.py --workdir=W --out=/tmp/compress-bench
        [--eval_batches=20] [--finetune_steps=300] [--rows=dense,int8,...]

For each row, compress.py writes W compressed into --out (rows that share nothing
are independent), then on one device:
  - validation perplexity over --eval_batches batches of W's validation data (the
    same batches for every row) and its change vs the dense model;
  - stored parameters (scales included) and weight bytes (int4 counted at half a
    byte), KV-cache bytes per
    token (model.dtype, or int8 for the int8-KV row);
  - greedy agreement: the fraction of validation positions whose argmax equals the
    dense model's (teacher-forced, so one early difference does not count twice);
  - decode tokens/s at batch 1 with the KV cache: (time of 64 new tokens - time of 1)
    / 63 after a 64-token prompt, median of 3.
It first prints how uneven each kernel's input norms are (what Wanda weighs by). The
"+ masked fine-tune" row trains the Wanda 50 % run for --finetune_steps with
train.py, optimizer.keep_sparsity and W's own config (subprocess). The last line
printed is JSON with every number.
"""

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import compress  # noqa: E402  (quiets the libraries' start-up first, like every entry point)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from checkpoints.read import load_run, load_sampler  # noqa: E402
from compression.calibrate import input_statistics  # noqa: E402
from compression.quantize import weight_bytes  # noqa: E402
from evaluation.text_data import eval_batches, text_data_config  # noqa: E402
from model.decode import cache_bytes_per_token, init_cache  # noqa: E402
from model.flops import count_params  # noqa: E402
from model.sampler import SamplingConfig, parse_mesh  # noqa: E402
from tools.export_hf import on_host  # noqa: E402

flags.DEFINE_string("workdir", None, "The dense run to compress.")
flags.DEFINE_string("out", "/tmp/compress-bench", "Where the compressed workdirs are written.")
flags.DEFINE_integer("eval_batches", 20, "Validation batches scored per row.")
flags.DEFINE_integer("finetune_steps", 300, "Masked fine-tuning steps of the Wanda 50 % row.")
flags.DEFINE_list("rows", [], "Only these rows (names as printed); default: all.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

FINETUNED = "wanda 50% + masked fine-tune"
ROWS = {"dense": [], "int8": ["--quantize=int8"], "int4 g128": ["--quantize=int4"]}
ROWS["int8 + embeddings"] = ["--quantize=int8", "--quantize_embeddings"]
ROWS["int4 g128 + embeddings"] = ["--quantize=int4", "--quantize_embeddings"]
ROWS["int8 KV cache"] = []
for _method in ("magnitude", "wanda"):
    for _sparsity in (10, 30, 50, 70):
        ROWS[f"{_method} {_sparsity}%"] = [f"--prune={_method}", f"--sparsity={_sparsity / 100}"]
    ROWS[f"{_method} 2:4"] = [f"--prune={_method}", "--n_m=2:4"]
for _method, _name in (("svd", "SVD"), ("whitened", "whitened SVD")):
    for _ratio in (0.9, 0.75, 0.5):
        ROWS[f"{_name} r={_ratio}"] = [f"--low_rank={_method}", f"--rank_ratio={_ratio}"]
ROWS[FINETUNED] = None  # trained from the "wanda 50%" row


def workdir_of(name: str) -> str:
    """The row's workdir, written by compress.py (or train.py) unless it exists."""
    if not ROWS.get(name):
        return FLAGS.workdir if name != FINETUNED else finetuned()
    path = os.path.join(FLAGS.out, name.replace(" ", "_").replace("%", "pct").replace(":", "-"))
    if not os.path.isdir(path):
        compress.compress(compress.parse_args([f"--workdir={FLAGS.workdir}", f"--output={path}"]
                                              + ROWS[name]))
    return path


def finetuned() -> str:
    path = os.path.join(FLAGS.out, "wanda50_finetuned")
    source = workdir_of("wanda 50%")
    command = [
        sys.executable, os.path.join(ROOT, "train.py"),
        f"--config=configs/json_file.py:{os.path.join(source, 'config.json')}",
        f"--workdir={path}", f"--config.train.init_from={source}",
        "--config.optimizer.keep_sparsity=true", f"--config.train.num_steps={FLAGS.finetune_steps}",
        "--config.optimizer.learning_rate=3e-4", "--config.optimizer.warmup_steps=10",
        f"--config.train.eval_every={FLAGS.finetune_steps}",
        f"--config.checkpoint.every_steps={FLAGS.finetune_steps}",
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return path


def score(sampler, batches, kv_cache_dtype: str):
    """(perplexity, argmax of every batch) over the validation batches. An int8 KV cache is
    scored through the cache: the whole window is written to it (quantized) and attends to
    it, as a prefill does."""
    model = sampler.model

    @jax.jit
    def forward(params, batch):
        inputs = (batch["inputs"], batch["segment_ids"], batch["positions"])
        if kv_cache_dtype == "model":
            logits = model.apply({"params": params}, *inputs)
        else:
            cache = init_cache(model.config, *batch["inputs"].shape, kv_cache_dtype)
            logits, _ = model.apply({"params": params}, *inputs, cache=cache)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["weights"]), jnp.argmax(logits, axis=-1)

    total, argmaxes = 0.0, []
    for batch in batches:
        nll, argmax = forward(sampler.params, batch)
        total += float(nll)
        argmaxes.append(np.asarray(argmax))
    return math.exp(total / sum(float(b["weights"].sum()) for b in batches)), argmaxes


def decode_tokens_per_second(sampler, kv_cache_dtype: str) -> float:
    prompt = [list(range(1, 65))]

    def seconds(new_tokens):
        sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0,
                                  kv_cache_dtype=kv_cache_dtype)
        sampler.generate(prompt, sampling, eos_id=-1)  # compile
        times = []
        for _ in range(3):
            start = time.perf_counter()
            sampler.generate(prompt, sampling, eos_id=-1)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return 63 / max(seconds(64) - seconds(1), 1e-9)


def input_norm_spread(run) -> str:
    """How uneven the kernels' input features are on the calibration data that Wanda
    weighs by: max / median of the input norms, the range over layers, per kernel."""
    args = compress.parse_args([f"--workdir={FLAGS.workdir}", "--output=unused"])
    batches = compress.calibration_batches(run.config, run.model_config, args)
    params = jax.device_get(load_run(FLAGS.workdir, abstract=on_host).params)
    stats = input_statistics(run.model_config, params, batches)
    spreads = []
    for module, kernels in stats["layers"].items():
        for name, leaves in kernels.items():
            norms = np.sqrt(np.asarray(leaves["sum_squares"]))
            norms = norms.reshape(run.model_config.num_layers, -1)
            ratio = norms.max(axis=1) / np.median(norms, axis=1)
            spreads.append(f"{module}/{name} {ratio.min():.1f}-{ratio.max():.1f}")
    return f"input norm max/median over {len(batches)} calibration batches: " + ", ".join(spreads)


def main(argv):
    del argv
    print(describe_machine())
    names = FLAGS.rows or list(ROWS)
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise SystemExit(f"error: --rows: no row {unknown}; the rows are {list(ROWS)}.")
    dense_sampler, run = load_sampler(FLAGS.workdir, parse_mesh("1,1,1"), jax.devices()[:1])
    data = text_data_config(run.config.data)
    batches = [
        {k: np.asarray(v) for k, v in b.items()}
        for b in eval_batches(data, run.config.train.global_batch_size,
                              run.model_config, FLAGS.eval_batches)
    ]
    dense_ppl, dense_argmax = score(dense_sampler, batches, "model")
    print(f"dense: {FLAGS.workdir} step {run.step}, {run.model_config.num_layers} layers x "
          f"{run.model_config.embed_dim}, validation perplexity {dense_ppl:.3f} over "
          f"{len(batches)} batches of {batches[0]['inputs'].shape} tokens")
    print(input_norm_spread(run))
    header = ("| method | ppl | Δ ppl | params | weight bytes | KV bytes/token | "
              "greedy agreement | decode tokens/s |")
    print(header + "\n|" + "---|" * 8)
    results = {}
    for name in names:
        kv = "int8" if name == "int8 KV cache" else "model"
        sampler, row_run = load_sampler(workdir_of(name), parse_mesh("1,1,1"), jax.devices()[:1])
        ppl, argmax = score(sampler, batches, kv)
        weights = [b["weights"] > 0 for b in batches]
        agree = sum(float(((a == d) & w).sum()) for a, d, w in zip(argmax, dense_argmax, weights))
        row = dict(
            perplexity=ppl,
            change=ppl / dense_ppl - 1,
            params=count_params(sampler.params),
            weight_bytes=weight_bytes(sampler.params),
            kv_bytes_per_token=cache_bytes_per_token(row_run.model_config, kv),
            greedy_agreement=agree / sum(float(w.sum()) for w in weights),
            decode_tokens_per_second=decode_tokens_per_second(sampler, kv),
        )
        results[name] = row
        print(f"| {name} | {ppl:.2f} | {row['change']:+.2%} | {row['params']:,} | "
              f"{row['weight_bytes']:,} | {row['kv_bytes_per_token']:,} | "
              f"{row['greedy_agreement']:.1%} | {row['decode_tokens_per_second']:.0f} |",
              flush=True)
    bf16 = cache_bytes_per_token(dataclasses.replace(run.model_config, dtype="bfloat16"))
    print(f"KV bytes/token of the same model with a bfloat16 cache: {bf16:,}")
    print(json.dumps({"dense_perplexity": dense_ppl, "bfloat16_kv_bytes_per_token": bf16,
                      "rows": results}))


if __name__ == "__main__":
    app.run(main)
