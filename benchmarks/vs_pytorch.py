"""meshlm vs a PyTorch reference GPT (nanoGPT's architecture), side by side on this machine.

    python benchmarks/vs_pytorch.py [--shapes=baby,default,gpt2_small] [--steps=30] [--breakdown]
        [--profile] [--cpu_devices=N]
    python benchmarks/vs_pytorch.py --whole_run [--seeds=0,1,2] [--num_steps=2000] [--cpu_devices=N]

Step mode times, in one process, meshlm's jitted train step (training.trainer.Trainer, a
fixed batch on device, as benchmarks/train_step.py) on one CPU device and, data parallel, on
as many of --cpu_devices devices (default: one per core; JAX_NUM_CPU_DEVICES) as split the
batch evenly, and the reference's step
(forward, mean cross-entropy, backward, global-norm clipping, AdamW) for the same shapes,
optimizer and float32, in alternating blocks so that a change of load hits both sides.
The reference (benchmarks/torch_gpt.py) is nanoGPT's GPT: pre-LayerNorm, causal attention, GELU
MLP, tied embeddings, learned positions, its init (std 0.02, residual projections scaled by
1/sqrt(2 layers)) and its weight decay groups (every matrix and embedding; meshlm is set to
optimizer.decay_embeddings=True to match). meshlm is configured as that GPT (model.* below);
the one difference is the GELU: meshlm's is the tanh approximation, nanoGPT's the exact erf.

--breakdown adds the loss's forward, forward + backward, and the MLP's matmuls alone.

Whole-run mode (benchmarks/vs_pytorch_whole_run.py) runs nanoGPT's CPU "baby GPT" recipe (4
layers, width 128, block 64, batch 12, lr 1e-3 cosine to 1e-4 after 100 warm-up steps, beta2
0.99, no dropout) from launch to exit on both sides, each in its own process.
Prints the machine, ms/step or seconds per run, the ratios, then one JSON line.
"""

import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

import startup  # noqa: E402
from benchmarks import cpu_profile, vs_pytorch_whole_run  # noqa: E402
from benchmarks.machine_info import cpu_model  # noqa: E402
from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from benchmarks.torch_gpt import GPT, mean_loss, torch_optimizer, torch_step  # noqa: E402

flags.DEFINE_list("shapes", ["baby", "default", "gpt2_small"], "Step mode: shapes to time.")
flags.DEFINE_integer("steps", 30, "Step mode: timed steps per side (gpt2_small: a fifth).")
flags.DEFINE_integer("warmup", 3, "Step mode: untimed steps per side after compilation.")
flags.DEFINE_bool(
    "breakdown", False, "Step mode: also time forward, forward + backward, the MLP's matmuls."
)
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
    import jax.numpy as jnp

    from data import batch as data_batch

    config = meshlm_config(shape)
    b, t, m = config.train.global_batch_size, config.data.seq_len, config.model
    host = data_batch.random_batch(b, t, m.vocab_size, config.seed, packed=False)
    meshlm = MeshlmStep(config, host, jax.devices()[:1])

    torch.manual_seed(config.seed)
    model = GPT(m)
    optimizer = torch_optimizer(model, config.optimizer)
    inputs, targets = (torch.from_numpy(np.asarray(host[k], np.int64)) for k in BATCH_KEYS)
    opt = config.optimizer
    lr = opt.learning_rate

    calls = {
        "meshlm": meshlm,
        "torch": lambda: torch_step(model, optimizer, inputs, targets, lr, opt.grad_clip_norm),
    }
    devices = data_parallel_devices(b)
    if devices > 1:
        calls["meshlm_data_parallel"] = MeshlmStep(config, host, jax.devices()[:devices])
    if FLAGS.breakdown:
        params = jax.tree.map(jnp.copy, meshlm.state.params)
        calls.update(breakdown_calls(meshlm.trainer, params, meshlm.batch, model, inputs, targets))
    steps = max(FLAGS.steps // (5 if shape == "gpt2_small" else 1), 2)
    seconds = alternate(calls, steps)
    profiles = {}
    if FLAGS.profile:
        for name in ("meshlm", "meshlm_data_parallel"):
            if name in calls:
                step = calls[name]
                profiles[f"{name}_profile"] = cpu_profile.profile(step, step.compiled.as_text())
    mesh_ms, torch_ms = 1e3 * seconds.pop("meshlm"), 1e3 * seconds.pop("torch")
    data_parallel = {}
    if "meshlm_data_parallel" in seconds:
        parallel_ms = 1e3 * seconds.pop("meshlm_data_parallel")
        data_parallel = dict(devices=devices, meshlm_data_parallel_ms=parallel_ms,
                             data_parallel_time_ratio=parallel_ms / torch_ms)
    return dict(
        shape=shape,
        layers=m.num_layers,
        width=m.embed_dim,
        heads=m.num_heads,
        vocab=m.vocab_size,
        batch=b,
        seq_len=t,
        params=meshlm.trainer.num_params,
        torch_params=sum(p.numel() for p in model.parameters()),
        steps=steps,
        meshlm_ms=mesh_ms,
        torch_ms=torch_ms,
        time_ratio=mesh_ms / torch_ms,  # <= 1: meshlm at least as fast
        **data_parallel,
        **profiles,
        load_average=os.getloadavg()[0],
        **{f"{name}_ms": 1e3 * value for name, value in seconds.items()},
    )


class MeshlmStep:
    """meshlm's compiled train step on `devices` (data parallel over them) and a fixed
    batch; a call runs one step and reads its loss."""

    def __init__(self, config, host: dict, devices):
        from training.trainer import Trainer

        self.trainer = Trainer(config, devices=devices)
        self.compiled, _ = self.trainer.compile()
        self.state, self.batch = self.trainer.init_state(), self.trainer.to_global(host)

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        float(metrics["loss"])


def data_parallel_devices(batch_size: int) -> int:
    """The most CPU devices, up to --cpu_devices, that split `batch_size` rows evenly."""
    return max(n for n in range(1, cpu_devices() + 1) if batch_size % n == 0)


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
        **matmul_calls(trainer.model_config, inputs.numel()),
    }


# The MLP's float32 matmuls over the batch's tokens: (name, input width, output width,
# kernel gradient?). A kernel's gradient contracts over the tokens, its forward over a width.
MATMULS = (
    ("mlp_in", "embed_dim", "mlp_dim", False),
    ("mlp_out", "mlp_dim", "embed_dim", False),
    ("mlp_in_grad", "embed_dim", "mlp_dim", True),
    ("mlp_out_grad", "mlp_dim", "embed_dim", True),
)
DOTS_PER_CALL = 10  # one call runs this many, so the call's dispatch is a tenth of each


def matmul_calls(model_config, tokens: int) -> dict:
    """--breakdown: each of MATMULS, DOTS_PER_CALL of them per call, each on operands of its
    own: meshlm's (model/layers.dot's forward, or its kernel gradient with the transposed
    copies `dot` makes for it, in one jitted program) against nn.Linear's in PyTorch (x @ W^T;
    dy^T @ x, which BLAS reads transposed without a copy): whether the matmuls explain the
    step's difference. Times are per call; divide by DOTS_PER_CALL for one matmul."""
    import jax
    import jax.numpy as jnp

    from model.layers import dot

    forward = lambda x, kernel: dot("te,eo->to", x, kernel, 1)

    def kernel_gradient(x, dy):
        kernel = jnp.zeros((x.shape[1], dy.shape[1]), x.dtype)
        return jax.vjp(lambda kernel: forward(x, kernel), kernel)[1](dy)[0]

    rng = np.random.default_rng(0)
    calls = {}
    for name, width_in, width_out, gradient in MATMULS:
        d_in, d_out = getattr(model_config, width_in), getattr(model_config, width_out)
        xs = rng.standard_normal((DOTS_PER_CALL, tokens, d_in), np.float32)
        # The second operands: output gradients [tokens, out], or kernels [in, out].
        ys = rng.standard_normal((DOTS_PER_CALL, tokens if gradient else d_in, d_out), np.float32)
        mesh_dot = kernel_gradient if gradient else forward
        dots = jax.jit(lambda xs, ys, f=mesh_dot: [f(x, y) for x, y in zip(xs, ys)])
        args = jax.device_put((list(xs), list(ys)), jax.devices()[0])
        calls[f"meshlm_{name}"] = lambda dots=dots, args=args: jax.block_until_ready(dots(*args))
        torch_xs = list(torch.from_numpy(xs))
        if gradient:
            torch_ys, torch_dot = list(torch.from_numpy(ys)), lambda x, dy: dy.T @ x
        else:  # nn.Linear's weight is [out, in]
            torch_ys = [kernel.T.contiguous() for kernel in torch.from_numpy(ys)]
            torch_dot = torch.nn.functional.linear
        calls[f"torch_{name}"] = lambda f=torch_dot, xs=torch_xs, ys=torch_ys: [
            f(x, y) for x, y in zip(xs, ys)
        ]
    return calls


def cpu_devices() -> int:
    return FLAGS.cpu_devices or os.cpu_count()


def main(argv):
    del argv
    startup.reuse_freed_memory()  # as every meshlm command does (both sides share it)
    torch.set_num_threads(os.cpu_count())
    if FLAGS.torch_run:
        values = json.loads(os.environ["VS_PYTORCH_CONFIG"])
        return vs_pytorch_whole_run.torch_run(meshlm_config("baby", values))
    print(describe_machine(), f"| torch {torch.__version__}, {torch.get_num_threads()} threads"
          f" | meshlm on up to {cpu_devices()} CPU device(s)")
    import jax

    jax.config.update("jax_num_cpu_devices", cpu_devices())  # before JAX starts its CPU client
    result = dict(cpu_model=cpu_model(), cores=os.cpu_count(), torch=torch.__version__,
                  cpu_devices=cpu_devices())
    if FLAGS.whole_run:
        baby = overrides("baby")
        devices = data_parallel_devices(baby["train.global_batch_size"])
        result["whole_run"] = vs_pytorch_whole_run.whole_run(baby, devices)
    else:
        result["shapes"] = []
        for shape in FLAGS.shapes:
            r = time_shape(shape)
            result["shapes"].append(r)
            print(f"{shape:>10}: {r['layers']}x{r['width']}, batch {r['batch']}x{r['seq_len']},"
                  f" vocab {r['vocab']}: meshlm {r['meshlm_ms']:.1f} ms/step, PyTorch "
                  f"{r['torch_ms']:.1f} ms/step, ratio {r['time_ratio']:.2f} (load "
                  f"{r['load_average']:.2f})", flush=True)
            if "meshlm_data_parallel_ms" in r:
                print(f"{'':>12}meshlm on {r['devices']} CPU devices (data parallel) "
                      f"{r['meshlm_data_parallel_ms']:.1f} ms/step, ratio "
                      f"{r['data_parallel_time_ratio']:.2f}", flush=True)
            for name, devices in (("meshlm", 1), ("meshlm_data_parallel", r.get("devices"))):
                if f"{name}_profile" in r:
                    print(f"{'':>12}profile, {devices} device(s): "
                          f"{cpu_profile.describe(r[f'{name}_profile'])}", flush=True)
            if FLAGS.breakdown:
                print(f"{'':>12}forward {r['meshlm_forward_ms']:.1f} vs {r['torch_forward_ms']:.1f}"
                      f" ms, forward + backward {r['meshlm_forward_backward_ms']:.1f} vs "
                      f"{r['torch_forward_backward_ms']:.1f} ms (meshlm vs PyTorch)", flush=True)
                dots = ", ".join(
                    f"{name} {r[f'meshlm_{name}_ms'] / DOTS_PER_CALL:.3f} vs "
                    f"{r[f'torch_{name}_ms'] / DOTS_PER_CALL:.3f}" for name, *_ in MATMULS
                )
                print(f"{'':>12}one matmul over the batch's tokens, ms: {dots}", flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
