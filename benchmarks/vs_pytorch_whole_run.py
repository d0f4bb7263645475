"""benchmarks/vs_pytorch.py --whole_run: nanoGPT's CPU "baby GPT" recipe, launch to exit.

meshlm's `python train.py` (data parallel over the CPU devices that split its batch) and
the PyTorch reference's own loop (`vs_pytorch.py --torch_run`: nanoGPT's GPT and AdamW from
benchmarks/torch_gpt.py), each in its own process, one seed after the other. Both read the
same token stream: a character-level tokenizer of the stdlib source (trained here once) and
meshlm's token cache, windows at random offsets (nanoGPT's sampling), not packed; both score
the whole validation split at the end. The flags are vs_pytorch.py's.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from absl import flags

from benchmarks.torch_gpt import GPT, learning_rate, torch_optimizer, torch_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VS_PYTORCH = os.path.join(ROOT, "benchmarks", "vs_pytorch.py")
FLAGS = flags.FLAGS


def whole_run_overrides(baby: dict) -> dict:
    """The baby-GPT recipe (`baby`: its config overrides) on the char-level stdlib stream,
    evaluated once on the whole split."""
    vocab_size = char_tokenizer().vocab_size
    return {
        **baby,
        "model.vocab_size": -(-vocab_size // 8) * 8,
        "data.tokenizer": char_tokenizer_path(),
        "data.cache_dir": os.path.join(FLAGS.out_dir, "cache"),
        "data.sampling": "random_offsets",
        "data.pack_documents": False,
        "data.eval_max_batches": 0,
        "train.num_steps": FLAGS.num_steps,
        "optimizer.warmup_steps": FLAGS.num_steps // 20,  # nanoGPT's 100 of 2,000
        "train.eval_every": 0,
        "checkpoint.every_steps": 0,
    }


def char_tokenizer_path() -> str:
    return os.path.join(FLAGS.out_dir, "stdlib_char.model")


def char_tokenizer():
    """The character-level tokenizer of the stdlib source, trained on first use."""
    from data import tokenizer, tokenizer_inputs

    path = char_tokenizer_path()
    if not os.path.exists(path):
        tokenizer.train_tokenizer(tokenizer_inputs.source_texts("stdlib"), path, vocab_size=100,
                                  model_type="char")
    return tokenizer.Tokenizer(path)


def flag_args(values: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def launch(args: list[str], env: dict | None = None) -> tuple[float, str]:
    """(seconds from launch to exit, stdout) of `python args...` in the repository."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def meshlm_run(seed: int, values: dict, devices: int) -> dict:
    workdir = os.path.join(FLAGS.out_dir, f"meshlm-seed{seed}")
    subprocess.run(["rm", "-rf", workdir], check=True)
    seconds, _ = launch(
        ["train.py", f"--workdir={workdir}", f"--config.seed={seed}", *flag_args(values)],
        env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices)),
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    eval_loss = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    return dict(seconds=seconds, eval_loss=eval_loss, steps_s=loop_seconds(records))


def loop_seconds(records: list[dict]) -> float:
    """The training loop's seconds from metrics.jsonl: each report's seconds per step times
    the steps since the previous report (train.py leaves the compiling first step out)."""
    logged = [(r["step"], r["step_time"]) for r in records if "step_time" in r]
    before = [0] + [step for step, _ in logged]
    return sum((step - previous) * seconds for previous, (step, seconds) in zip(before, logged))


def torch_run(config) -> None:
    """One reference run of the whole-run recipe (a process of its own; `config`: meshlm's
    config of it): nanoGPT's loop on meshlm's token stream, the whole validation split at
    the end, a checkpoint; prints JSON."""
    start = time.perf_counter()
    from data import token_cache, windows  # imports JAX (~1 s, reported as import_s)

    import_s = time.perf_counter() - start
    directory = config.data.cache_dir
    manifest = token_cache.read_manifest(directory)
    split = lambda name: token_cache.open_split(directory, manifest, name)
    data_kwargs = dict(global_batch_size=config.train.global_batch_size, process_index=0,
                       process_count=1)
    train_iter = windows.TrainIterator(split("train"), config.data, "", seed=FLAGS.seed,
                                       **data_kwargs)
    torch.manual_seed(FLAGS.seed)
    model = GPT(config.model)
    opt, num_steps = config.optimizer, config.train.num_steps
    optimizer = torch_optimizer(model, opt)
    as_tensor = lambda batch, k: torch.from_numpy(np.asarray(batch[k], np.int64))
    start = time.perf_counter()
    for step in range(num_steps):
        batch = next(train_iter)
        lr = learning_rate(step, opt, num_steps)
        loss = torch_step(model, optimizer, as_tensor(batch, "inputs"), as_tensor(batch, "targets"),
                          lr, opt.grad_clip_norm)
        if not math.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}")
    steps_s, start = time.perf_counter() - start, time.perf_counter()
    model.eval()
    ce_sum = weight_sum = 0.0
    with torch.no_grad():
        for batch in windows.EvalStream(split("eval"), config.data, **data_kwargs):
            logits = model(as_tensor(batch, "inputs"))
            targets = as_tensor(batch, "targets").flatten()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
            weights = torch.from_numpy(np.asarray(batch["weights"], np.float32)).flatten()
            ce_sum += float((ce * weights).sum())
            weight_sum += float(weights.sum())
    eval_s = time.perf_counter() - start
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               os.path.join(FLAGS.out_dir, f"torch-seed{FLAGS.seed}.pt"))
    print(json.dumps({"eval_loss": ce_sum / weight_sum, "import_s": import_s,
                      "steps_s": steps_s, "eval_s": eval_s}))


def whole_run(baby: dict, devices: int) -> dict:
    """Both sides' runs for every --seeds; meshlm data parallel on `devices` CPU devices."""
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    values = whole_run_overrides(baby)
    launch(["-m", "data.prepare", *flag_args(values)])  # the token cache: once, not timed
    torch_env = dict(os.environ, VS_PYTORCH_CONFIG=json.dumps(values))
    runs = []
    for seed in map(int, FLAGS.seeds):
        mesh = meshlm_run(seed, values, devices)
        seconds, out = launch([VS_PYTORCH, "--torch_run", f"--seed={seed}",
                               f"--out_dir={FLAGS.out_dir}"], env=torch_env)
        ref = json.loads(out.strip().splitlines()[-1])
        runs.append(dict(seed=seed, meshlm_s=mesh["seconds"], meshlm_eval_loss=mesh["eval_loss"],
                         meshlm_steps_s=mesh["steps_s"], torch_s=seconds,
                         torch_eval_loss=ref["eval_loss"], torch_import_s=ref["import_s"],
                         torch_steps_s=ref["steps_s"], torch_eval_s=ref["eval_s"],
                         load_average=os.getloadavg()[0]))
        print(f"seed {seed}: meshlm {mesh['seconds']:.1f} s (steps {mesh['steps_s']:.1f} s), val "
              f"loss {mesh['eval_loss']:.4f} | PyTorch {seconds:.1f} s (steps "
              f"{ref['steps_s']:.1f} s, evaluation {ref['eval_s']:.1f} s), val loss "
              f"{ref['eval_loss']:.4f}", flush=True)
    mean = lambda key: statistics.mean(r[key] for r in runs)
    summary = {k: mean(k) for k in ("meshlm_s", "torch_s", "meshlm_eval_loss", "torch_eval_loss",
                                     "meshlm_steps_s", "torch_steps_s")}
    summary["time_ratio"] = summary["meshlm_s"] / summary["torch_s"]
    print(f"mean over {len(runs)} seeds: meshlm {summary['meshlm_s']:.1f} s "
          f"(val {summary['meshlm_eval_loss']:.4f}), PyTorch {summary['torch_s']:.1f} s "
          f"(val {summary['torch_eval_loss']:.4f}); time ratio {summary['time_ratio']:.2f}")
    return dict(num_steps=FLAGS.num_steps, vocab_size=values["model.vocab_size"], runs=runs,
                meshlm_devices=devices, **summary)
