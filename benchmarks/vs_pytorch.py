"""meshlm vs a PyTorch reference GPT (nanoGPT's architecture), side by side on this machine.

    python benchmarks/vs_pytorch.py [--shapes=baby,default,gpt2_small] [--steps=30] [--breakdown]
    python benchmarks/vs_pytorch.py --whole_run [--seeds=0,1,2] [--num_steps=2000]

Step mode times, in one process, meshlm's jitted train step (training.trainer.Trainer, a
fixed batch on device, as benchmarks/train_step.py) on one CPU device and, data parallel, on
--cpu_devices devices (one per core by default: JAX_NUM_CPU_DEVICES), and the reference's step
(forward, mean cross-entropy, backward, global-norm clipping, AdamW) for the same shapes,
optimizer and float32, in alternating blocks so that a change of load hits both sides.
The reference (benchmarks/torch_gpt.py) is nanoGPT's GPT: pre-LayerNorm, causal attention, GELU
MLP, tied embeddings, learned positions, its init (std 0.02, residual projections scaled by
1/sqrt(2 layers)) and its weight decay groups (every matrix and embedding; meshlm is set to
optimizer.decay_embeddings=True to match). meshlm is configured as that GPT (model.* below);
the one difference is the GELU: meshlm's is the tanh approximation, nanoGPT's the exact erf.

Whole-run mode runs nanoGPT's CPU "baby GPT" recipe (4 layers, width 128, block 64, batch
12, lr 1e-3 cosine to 1e-4 after 100 warm-up steps, beta2 0.99, no dropout) from launch to
exit on both sides, each in its own process: `python train.py` (on --cpu_devices devices)
against this file's `--torch_run` loop. Both read the same token stream: a character-level tokenizer of the
stdlib source (trained here once) and meshlm's token cache, windows at random offsets
(nanoGPT's sampling) and not packed; both score the whole validation split at the end.
Prints the machine, ms/step or seconds per run, the ratios, then one JSON line.
"""

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import cpu_profile  # noqa: E402
from benchmarks.machine_info import cpu_model, describe as describe_machine  # noqa: E402
from benchmarks.torch_gpt import (  # noqa: E402
    GPT,
    learning_rate,
    mean_loss,
    torch_optimizer,
    torch_step,
)

flags.DEFINE_list("shapes", ["baby", "default", "gpt2_small"], "Step mode: shapes to time.")
flags.DEFINE_integer("steps", 30, "Step mode: timed steps per side (gpt2_small: a fifth).")
flags.DEFINE_integer("warmup", 3, "Step mode: untimed steps per side after compilation.")
flags.DEFINE_bool("breakdown", False, "Step mode: also time forward, forward + backward.")
flags.DEFINE_integer(
    "cpu_devices", 0, "CPU devices meshlm splits the host into (JAX_NUM_CPU_DEVICES); 0: one per "
    "core. Step mode times one device too; the whole run uses these."
)
flags.DEFINE_bool("profile", False, "Step mode: where meshlm's step time goes (a trace).")
flags.DEFINE_bool("whole_run", False, "Time the baby-GPT recipe launch to exit, both sides.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Whole run: seeds, each run on both sides.")
flags.DEFINE_integer("num_steps", 2000, "Whole run: training steps.")
flags.DEFINE_string("out_dir", "/tmp/meshlm_vs_pytorch", "Whole run: tokenizer, cache, workdirs.")
flags.DEFINE_bool("torch_run", False, "Internal: one reference run (--seed) of the whole run.")
flags.DEFINE_integer("seed", 0, "Internal: the --torch_run's seed.")
FLAGS = flags.FLAGS

BATCH_KEYS = ("inputs", "targets")
COMMON = {"model.dropout_rate": 0.0, "model.dtype": "float32", "optimizer.decay_embeddings": True}
# (config file, overrides): nanoGPT's shapes as meshlm config fields.
SHAPES = {
    "baby": (
        "configs.default",
        {
            "model.vocab_size": 65,
            "model.num_layers": 4,
            "model.num_heads": 4,
            "model.embed_dim": 128,
            "model.mlp_dim": 512,
            "model.max_seq_len": 64,
            "model.use_bias": False,  # nanoGPT's bias=False default
            "model.scan_unroll": 4,
            "data.seq_len": 64,
            "train.global_batch_size": 12,
            "train.num_steps": 2000,
            "optimizer.learning_rate": 1e-3,
            "optimizer.warmup_steps": 100,
            "optimizer.final_lr_fraction": 0.1,
            "optimizer.b2": 0.99,
            "optimizer.weight_decay": 0.1,
        },
    ),
    "default": ("configs.default", {}),
    "gpt2_small": (
        "configs.gpt2_small",
        {
            "model.attention_implementation": "xla",
            "model.loss_chunk_size": 0,
            "model.scan_unroll": 12,
            "data.seq_len": 256,
            "train.global_batch_size": 4,
            "train.num_microbatches": 1,
        },
    ),
}


def overrides(shape: str) -> dict:
    return {**COMMON, **SHAPES[shape][1]}


def meshlm_config(shape: str, extra: dict | None = None):
    """The ml_collections config of `shape`, as train.py builds it from the same flags."""
    config = importlib.import_module(SHAPES[shape][0]).get_config()
    for name, value in {**overrides(shape), **(extra or {})}.items():
        section, field = name.split(".")
        config[section][field] = value
    return config


def time_shape(shape: str) -> dict:
    import jax

    from data import batch as data_batch

    config = meshlm_config(shape)
    b, t, m = config.train.global_batch_size, config.data.seq_len, config.model
    host = data_batch.random_batch(b, t, m.vocab_size, config.seed, packed=False)
    trainer, meshlm_step = meshlm_step_call(config, host, jax.devices()[:1])

    torch.manual_seed(config.seed)
    model = GPT(m)
    optimizer = torch_optimizer(model, config.optimizer)
    inputs, targets = (torch.from_numpy(np.asarray(host[k], np.int64)) for k in BATCH_KEYS)
    opt = config.optimizer
    lr = opt.learning_rate

    calls = {
        "meshlm": meshlm_step,
        "torch": lambda: torch_step(model, optimizer, inputs, targets, lr, opt.grad_clip_norm),
    }
    if jax.device_count() > 1:
        calls["meshlm_per_core"] = meshlm_step_call(config, host, jax.devices())[1]
    if FLAGS.breakdown:
        params = trainer.init_state().params
        calls.update(breakdown_calls(trainer, params, trainer.to_global(host), model, inputs,
                                     targets))
    steps = max(FLAGS.steps // (5 if shape == "gpt2_small" else 1), 2)
    seconds = alternate(calls, steps)
    profiles = {}
    if FLAGS.profile:
        for name in ("meshlm", "meshlm_per_core"):
            if name in calls:
                profiles[f"{name}_profile"] = cpu_profile.profile(calls[name],
                                                                 calls[name].hlo_text)
    mesh_ms, torch_ms = 1e3 * seconds.pop("meshlm"), 1e3 * seconds.pop("torch")
    per_core = {}
    if "meshlm_per_core" in seconds:
        per_core_ms = 1e3 * seconds.pop("meshlm_per_core")
        per_core = dict(devices=jax.device_count(), meshlm_per_core_ms=per_core_ms,
                        per_core_time_ratio=per_core_ms / torch_ms)
    return dict(
        shape=shape,
        layers=m.num_layers,
        width=m.embed_dim,
        heads=m.num_heads,
        vocab=m.vocab_size,
        batch=b,
        seq_len=t,
        params=trainer.num_params,
        torch_params=sum(p.numel() for p in model.parameters()),
        steps=steps,
        meshlm_ms=mesh_ms,
        torch_ms=torch_ms,
        time_ratio=mesh_ms / torch_ms,  # <= 1: meshlm at least as fast
        **per_core,
        **profiles,
        load_average=os.getloadavg()[0],
        **{f"{name}_ms": 1e3 * value for name, value in seconds.items()},
    )


def meshlm_step_call(config, host: dict, devices):
    """(trainer, a call running one train step on `devices`, data parallel, and reading its
    loss)."""
    from training.trainer import Trainer

    trainer = Trainer(config, devices=devices)
    compiled, _ = trainer.compile()
    state, batch = trainer.init_state(), trainer.to_global(host)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        float(metrics["loss"])

    step.hlo_text = compiled.as_text()  # for --profile
    return trainer, step


def alternate(calls: dict, steps: int) -> dict:
    """Median seconds of each call over `steps` calls after --warmup ones, timed in
    alternating blocks of up to 5 calls: a change of load hits every call alike."""
    for call in calls.values():
        for _ in range(FLAGS.warmup):
            call()
    block = max(1, min(5, steps // 4))
    times = {name: [] for name in calls}
    for _ in range(-(-steps // block)):
        for name, call in calls.items():
            for _ in range(block):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown_calls(trainer, params, batch, model, inputs, targets) -> dict:
    """--breakdown: the loss's forward alone and forward + backward on both sides, to show
    which part of the step the time difference is in."""
    import jax

    from training.step import forward_sums

    loss = lambda p: forward_sums(trainer.model, p, batch, None, 0.0)[0]
    forward, gradients = jax.jit(loss), jax.jit(jax.value_and_grad(loss))

    def torch_forward():
        with torch.no_grad():
            mean_loss(model, inputs, targets).item()

    def torch_backward():  # leaves no gradients behind, as torch_step does
        value = mean_loss(model, inputs, targets)
        value.backward()
        value.item()
        model.zero_grad(set_to_none=True)

    return {
        "meshlm_forward": lambda: float(forward(params)),
        "meshlm_forward_backward": lambda: jax.block_until_ready(gradients(params)),
        "torch_forward": torch_forward,
        "torch_forward_backward": torch_backward,
    }


# --- whole-run mode -----------------------------------------------------------------------


def whole_run_overrides() -> dict:
    """The baby-GPT recipe on the char-level stdlib stream, evaluated once on the whole split."""
    vocab_size = char_tokenizer().vocab_size
    return {
        **overrides("baby"),
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


def meshlm_run(seed: int, values: dict) -> dict:
    workdir = os.path.join(FLAGS.out_dir, f"meshlm-seed{seed}")
    subprocess.run(["rm", "-rf", workdir], check=True)
    seconds, _ = launch(
        ["train.py", f"--workdir={workdir}", f"--config.seed={seed}", *flag_args(values)],
        env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(cpu_devices())),
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    eval_loss = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    # The loop's own step times (train.py leaves the compiling first step out of them).
    logged = [(r["step"], r["step_time"]) for r in records if "step_time" in r]
    steps_s = sum((step - before) * t for (before, _), (step, t) in zip([(0, 0)] + logged, logged))
    return dict(seconds=seconds, eval_loss=eval_loss, steps_s=steps_s)


def torch_run() -> None:
    """One reference run of the whole-run recipe (a process of its own): nanoGPT's loop on
    meshlm's token stream, the whole validation split at the end, a checkpoint; prints JSON."""
    start = time.perf_counter()
    from data import token_cache, windows  # imports JAX (~1 s, reported as import_s)

    import_s = time.perf_counter() - start
    values = json.loads(os.environ["VS_PYTORCH_CONFIG"])
    config = meshlm_config("baby", values)
    directory = values["data.cache_dir"]
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


def whole_run() -> dict:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    values = whole_run_overrides()
    launch(["-m", "data.prepare", *flag_args(values)])  # the token cache: once, not timed
    env_config = json.dumps(values)
    runs = []
    for seed in map(int, FLAGS.seeds):
        mesh = meshlm_run(seed, values)
        os.environ["VS_PYTORCH_CONFIG"] = env_config
        seconds, out = launch([__file__, "--torch_run", f"--seed={seed}",
                               f"--out_dir={FLAGS.out_dir}"])
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
                **summary)


def cpu_devices() -> int:
    return FLAGS.cpu_devices or os.cpu_count()


def main(argv):
    del argv
    torch.set_num_threads(os.cpu_count())
    if FLAGS.torch_run:
        return torch_run()
    sides = {cpu_devices()} if FLAGS.whole_run else {1, cpu_devices()}
    print(describe_machine(), f"| torch {torch.__version__}, {torch.get_num_threads()} threads"
          f" | meshlm on {' and '.join(map(str, sorted(sides)))} CPU device(s)")
    import jax

    jax.config.update("jax_num_cpu_devices", cpu_devices())  # before JAX starts its CPU client
    result = dict(cpu_model=cpu_model(), cores=os.cpu_count(), torch=torch.__version__,
                  cpu_devices=cpu_devices())
    if FLAGS.whole_run:
        result["whole_run"] = whole_run()
    else:
        result["shapes"] = []
        for shape in FLAGS.shapes:
            r = time_shape(shape)
            result["shapes"].append(r)
            print(f"{shape:>10}: {r['layers']}x{r['width']}, batch {r['batch']}x{r['seq_len']},"
                  f" vocab {r['vocab']}: meshlm {r['meshlm_ms']:.1f} ms/step, PyTorch "
                  f"{r['torch_ms']:.1f} ms/step, ratio {r['time_ratio']:.2f} (load "
                  f"{r['load_average']:.2f})", flush=True)
            if "meshlm_per_core_ms" in r:
                print(f"{'':>12}meshlm on {r['devices']} CPU devices (data parallel) "
                      f"{r['meshlm_per_core_ms']:.1f} ms/step, ratio "
                      f"{r['per_core_time_ratio']:.2f}", flush=True)
            for name, devices in (("meshlm", 1), ("meshlm_per_core", r.get("devices"))):
                if f"{name}_profile" in r:
                    print(f"{'':>12}profile, {devices} device(s): "
                          f"{cpu_profile.describe(r[f'{name}_profile'])}", flush=True)
            if FLAGS.breakdown:
                print(f"{'':>12}forward {r['meshlm_forward_ms']:.1f} vs {r['torch_forward_ms']:.1f}"
                      f" ms, forward + backward {r['meshlm_forward_backward_ms']:.1f} vs "
                      f"{r['torch_forward_backward_ms']:.1f} ms (meshlm vs PyTorch)", flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
