"""`sweep.py --vectorized`: N trials that differ only in shape-preserving
hyperparameters, trained as one jitted program.

Params and optimizer states are stacked on a leading `trials` axis and the
unchanged train step (training/step.py) runs under `jax.vmap`, so one compile
serves the whole sweep and small models keep a device busy. The trial axis is
placed on devices by the `trials` logical rule (sharding/rules.py: the mesh's
`data` axis, of size gcd(trials, devices)); each trial's batch and params are
sharded over the rest of the devices (`fsdp`), so every device works whatever
the trial count (_mesh_shape). Each trial's hyperparameters live in its optimizer state as traced
scalars, and each trial writes config.json and metrics.jsonl to its own workdir
like a train.py run. There are no checkpoints: an interrupted vectorized sweep
starts its unfinished trials over.
"""

import math
import time
from types import SimpleNamespace
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from data.config import encoder_length
from data.pipeline import make_eval_batches, make_train_iterator
from errors import UserError
from model import Transformer
from paths import workdir_path
from sharding import activate, batch_sharding, logical_rules, logical_sharding, make_mesh
from training import loss_scale, sweeps
from training.config import tokens_per_step, validate_config
from training.metrics import MetricsWriter
from training.optimizer import make_optimizer
from training.state import TrainState, state_shardings
from training.step import forward_sums, make_train_step

HYPERPARAMETERS = ("learning_rate", "warmup_steps", "weight_decay", "b1", "b2", "eps")
VECTORIZABLE = tuple(f"optimizer.{name}" for name in HYPERPARAMETERS) + ("seed",)


def trial_schedule(opt_config, num_steps: int) -> optax.Schedule:
    """learning_rate_schedule with the peak and the warmup as traced values (optax's schedules
    test their lengths in Python): linear warmup, then cosine, linear or no decay."""
    peak, warmup, floor = (
        opt_config.learning_rate,
        opt_config.warmup_steps,
        opt_config.final_lr_fraction,
    )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / jnp.maximum(num_steps - warmup, 1.0), 0.0, 1.0)
        decay = {
            "cosine": lambda: floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress)),
            "linear": lambda: 1 - (1 - floor) * progress,
            "constant": lambda: jnp.ones_like(progress),
        }[opt_config.schedule]()
        return jnp.where(step < warmup, peak * step / jnp.maximum(warmup, 1.0), peak * decay)

    return schedule


class TrialOptState(NamedTuple):
    hyperparameters: dict  # HYPERPARAMETERS -> float32 scalar, one set per trial
    inner: Any  # make_optimizer's state


def trial_optimizer(opt_config, num_steps: int):
    """(tx, rate): make_optimizer's AdamW, rebuilt at each update from the hyperparameters kept
    in its state, and rate(hyperparameters, step), the learning rate it applies."""
    static = opt_config.to_dict()

    def with_values(hyperparameters):
        return SimpleNamespace(**{**static, **hyperparameters})

    def build(hyperparameters):
        config = with_values(hyperparameters)
        return make_optimizer(config, num_steps, trial_schedule(config, num_steps))[0]

    def init(params):
        hyperparameters = {k: jnp.asarray(static[k], jnp.float32) for k in HYPERPARAMETERS}
        return TrialOptState(hyperparameters, build(hyperparameters).init(params))

    def update(updates, state, params=None, *, step, **extra_args):
        tx = build(state.hyperparameters)
        updates, inner = tx.update(updates, state.inner, params, step=step, **extra_args)
        return updates, TrialOptState(state.hyperparameters, inner)

    def rate(hyperparameters, step):
        return trial_schedule(with_values(hyperparameters), num_steps)(step)

    return optax.GradientTransformationExtraArgs(init, update), rate


def _check_fields(named: dict) -> None:
    for overrides in named.values():
        for key in overrides:
            if key not in VECTORIZABLE:
                raise UserError(
                    f"--vectorized: the sweep sets {key}, which may change shapes or the program; "
                    f"only {', '.join(VECTORIZABLE)} can vary. Run it without --vectorized."
                )


def _mesh_shape(num_trials: int, config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp): the trials split over `data`, each trial's batch over `fsdp`; all devices
    unless a microbatch cannot be split that many ways, which is warned about."""
    data = math.gcd(num_trials, num_devices)
    per_micro = config.train.global_batch_size // config.train.num_microbatches
    room = num_devices // data
    fsdp = max(d for d in range(1, room + 1) if room % d == 0 and per_micro % d == 0)
    if data * fsdp < num_devices:
        logging.warning(
            "Vectorized sweep: %d trials use %d of the %d devices (a microbatch of %d sequences "
            "does not split over %d); trial counts that are multiples of %d use all of them.",
            num_trials,
            data * fsdp,
            num_devices,
            per_micro,
            room,
            num_devices // math.gcd(num_devices, per_micro),
        )
    return data, fsdp


class _Sweep:
    """Mesh, stacked state and the jitted vmapped train and eval steps for `configs`."""

    def __init__(self, configs: dict):
        self.names = list(configs)
        self.configs = configs
        config = next(iter(configs.values()))
        self.config = config
        devices = jax.devices()  # the global list: the same on every process
        data, fsdp = _mesh_shape(len(configs), config, len(devices))
        config.mesh.update(stage=1, data=1, fsdp=fsdp, expert=1, tensor=1)  # what one trial sees
        model_config = validate_config(config, fsdp, jax.process_count())
        config.mesh.data = data
        self.mesh = make_mesh(config.mesh, devices[: data * fsdp])
        self.rules = logical_rules(config.sharding_rules + ",batch=fsdp")
        self.model = Transformer(model_config)
        num_steps = config.train.num_steps
        tx, rate = trial_optimizer(config.optimizer, num_steps)
        _, shardings = state_shardings(self.model, tx, self.mesh, self.rules, config.data.seq_len)
        axis = nn.logical_to_mesh_axes(("trials",), self.rules)[0]
        stacked = jax.tree.map(
            lambda s: NamedSharding(self.mesh, PartitionSpec(axis, *s.spec)), shardings
        )
        self.batch_sharding = logical_sharding(self.mesh, self.rules, ("trials", "batch", "length"))
        step = make_train_step(
            self.model,
            tx,
            lambda step: 0.0,  # replaced by each trial's own rate below
            self.mesh,
            self.rules,
            shardings,
            num_microbatches=config.train.num_microbatches,
            z_loss_weight=config.train.z_loss_weight,
            skip_nonfinite_updates=config.train.skip_nonfinite_updates,
            seed=config.seed,
        ).jitted

        def train_step(state, batch):
            new_state, metrics = jax.vmap(step, spmd_axis_name=axis)(state, batch)
            rates = jax.vmap(rate)(state.opt_state.hyperparameters, state.step)
            return new_state, {**metrics, "learning_rate": rates}

        def eval_step(params, batch):
            sums = jax.vmap(
                lambda p: forward_sums(self.model, p, batch, None, 0.0)[1:], spmd_axis_name=axis
            )
            return sums(params)

        def init(seeds, hyperparameters):
            def one(seed, h):
                tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
                params = nn.meta.unbox(
                    self.model.init({"params": jax.random.key(seed)}, tokens)["params"]
                )
                opt_state = tx.init(params)._replace(hyperparameters=h)
                return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

            return jax.vmap(one, spmd_axis_name=axis)(seeds, hyperparameters)

        per_trial = NamedSharding(self.mesh, PartitionSpec(axis))
        self.train_step = jax.jit(
            train_step,
            in_shardings=(stacked, self.batch_sharding),
            out_shardings=(stacked, per_trial),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            eval_step,
            in_shardings=(stacked.params, batch_sharding(self.mesh, self.rules)),
            out_shardings=per_trial,
        )
        self.init = jax.jit(init, out_shardings=stacked)

    def init_state(self):
        seeds = np.array([c.seed for c in self.configs.values()], np.uint32)
        hyperparameters = {
            k: np.array([c.optimizer[k] for c in self.configs.values()], np.float32)
            for k in HYPERPARAMETERS
        }
        with activate(self.mesh, self.rules):
            return self.init(seeds, hyperparameters)


def _valid_configs(base_config, workdir: str, named: dict) -> dict:
    """{name: config} of the trials to run; a trial whose overrides fail validation is recorded
    as failed, a finished one is skipped."""
    configs = {}
    for name, overrides in named.items():
        trial_dir = workdir_path(workdir) / name
        if sweeps.read_status(trial_dir)["status"] == "done":
            print(f"skipped (done): {trial_dir}", flush=True)
            continue
        try:
            config = sweeps.apply_overrides(base_config, overrides)
            config.mesh.update(stage=1, data=1, fsdp=1, expert=1, tensor=1)
            validate_config(config, 1, jax.process_count())
        except UserError as error:
            sweeps.write_status(trial_dir, "failed", f"error: {error}")
            print(f"failed: {trial_dir} error: {error}", flush=True)
            continue
        configs[name] = config
    return configs


def run(base_config, workdir: str, named: dict) -> None:
    """Trains the unfinished trials of `named` ({name: overrides}) together, each writing
    config.json, metrics.jsonl and status.json to workdir/<name>."""
    _check_fields(named)
    if base_config.lora.rank:
        raise UserError("--vectorized: LoRA (lora.rank > 0) is not supported; run it without.")
    if base_config.distill.teacher:
        raise UserError("--vectorized: distill.teacher is not supported; run it without.")
    if base_config.model.get("num_experts", 0):
        raise UserError(
            "--vectorized: mixture of experts (model.num_experts > 0) is not supported; run the "
            "sweep without --vectorized."
        )
    if base_config.optimizer.name != "adamw":
        # trial_optimizer rebuilds AdamW at every update; Muon reads its matrices' axes once,
        # from the boxed params its state is made from (training/optimizer.py MuonAxes).
        raise UserError(
            f"--vectorized: optimizer.name={base_config.optimizer.name} is not supported; "
            "run the sweep without --vectorized."
        )
    if loss_scale.from_config(base_config, base_config.model):
        raise UserError(
            "--vectorized: float16 loss scaling (train.loss_scale) is not supported; use "
            "model.dtype=bfloat16, or train.loss_scale=none."
        )
    configs = _valid_configs(base_config, workdir, named)
    if not configs:
        return
    if len({c.seed for c in configs.values()}) > 1 and base_config.model.dropout_rate > 0:
        raise UserError("--vectorized: sweeping seed with model.dropout_rate > 0 is not supported.")
    sweep = _Sweep(configs)
    config, train_cfg = sweep.config, sweep.config.train
    data_kwargs = dict(
        global_batch_size=train_cfg.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model_vocab_size=sweep.model.config.vocab_size,
        train_config=train_cfg,  # its objective transforms the batches (data/objectives.py)
        encoder_seq_len=encoder_length(config.data, sweep.model.config.encoder_layers),
    )
    streams = {  # one stream per seed: a trial sees the batches it would see alone
        seed: make_train_iterator(config.data, seed=seed, **data_kwargs)
        for seed in {c.seed for c in configs.values()}
    }
    eval_batches = make_eval_batches(config.data, **data_kwargs)
    writers, errors = {}, {}
    for name, trial_config in configs.items():
        trial_dir = workdir_path(workdir) / name
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "metrics.jsonl").unlink(missing_ok=True)  # an interrupted start, redone
        (trial_dir / "config.json").write_text(trial_config.to_json_best_effort(indent=2))
        sweeps.write_status(trial_dir, "interrupted")  # until it finishes
        writers[name] = MetricsWriter(trial_dir, trial_config)
    logging.info("Vectorized sweep: %d trials on a %s mesh", len(configs), dict(sweep.mesh.shape))

    def log(step, records):
        for name, record in zip(sweep.names, records):
            if name not in errors:
                writers[name].write(step, record)
                writers[name].console(step, train_cfg.num_steps, record)

    with activate(sweep.mesh, sweep.rules):
        state = sweep.init_state()
        clock, clock_step = time.perf_counter(), 0
        for step in range(1, train_cfg.num_steps + 1):
            by_seed = {seed: next(stream) for seed, stream in streams.items()}
            batch = {
                k: np.stack([by_seed[c.seed][k] for c in configs.values()])
                for k in next(iter(by_seed.values()))
            }
            placed = jax.make_array_from_process_local_data(sweep.batch_sharding, batch)
            state, metrics = sweep.train_step(state, placed)
            if step == 1:  # the first step compiles: left out of the step time
                jax.block_until_ready(state)
                clock, clock_step = time.perf_counter(), 1
            if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
                metrics = jax.device_get(metrics)
                step_time = (time.perf_counter() - clock) / max(step - clock_step, 1)
                clock, clock_step = time.perf_counter(), step
                for i, name in enumerate(sweep.names):
                    if not metrics["finite"][i] and not train_cfg.skip_nonfinite_updates:
                        errors.setdefault(name, f"Non-finite loss by step {step}.")
                log(
                    step,
                    [
                        _record(metrics, i, configs[n], step, step_time)
                        for i, n in enumerate(sweep.names)
                    ],
                )
            eval_every = train_cfg.eval_every
            if step == train_cfg.num_steps or (eval_every and step % eval_every == 0):
                log(step, _evaluate(sweep, state.params, eval_batches))
                clock, clock_step = time.perf_counter(), step
    for name in sweep.names:
        writers[name].close()
        status = ("failed", errors[name]) if name in errors else ("done", "")
        sweeps.write_status(workdir_path(workdir) / name, *status)


def _record(metrics, i: int, config, step: int, step_time: float) -> dict:
    """Trial i's metrics.jsonl record, as training/loop.py writes it (its tokens/s is the
    sweep's divided by the number of trials)."""
    cross_entropy = float(metrics["cross_entropy"][i])
    return {
        "loss": float(metrics["loss"][i]),
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(min(cross_entropy, 50.0)),
        "learning_rate": float(metrics["learning_rate"][i]),
        "grad_norm": float(metrics["grad_norm"][i]),
        "param_norm": float(metrics["param_norm"][i]),
        "num_tokens": float(metrics["num_tokens"][i]),
        "step_time": step_time,
        "tokens_per_second": tokens_per_step(config) / step_time,
        "mfu": math.nan,  # not split per trial; see BENCHMARKS.md for the sweep's throughput
        "eta_seconds": step_time * (config.train.num_steps - step),
    }


def _evaluate(sweep: _Sweep, params, eval_batches) -> list[dict]:
    totals = np.zeros((len(sweep.names), 2))
    sharding = batch_sharding(sweep.mesh, sweep.rules)
    for batch in eval_batches:
        placed = jax.make_array_from_process_local_data(sharding, batch)  # one call: one transfer
        ce_sum, weight_sum = jax.device_get(sweep.eval_step(params, placed))
        totals += np.stack([ce_sum, weight_sum], axis=1)
    losses = totals[:, 0] / np.maximum(totals[:, 1], 1.0)
    return [
        {
            "eval_loss": float(loss),
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_tokens": float(t),
        }
        for loss, t in zip(losses, totals[:, 1])
    ]
