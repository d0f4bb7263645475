"""The training loop behind train.py: set-up, steps, evaluation, metrics, checkpoints.

The device is kept busy by asynchronous dispatch: step n is queued before the
host reads step n-1's metrics, and the next batch is prepared while step n
runs. The host only waits for the current step when it must: before saving a
checkpoint (so a non-finite loss never reaches the disk) and before evaluating.
"""

import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from data.pipeline import make_eval_batches, make_train_iterator
from errors import UserError
from training.checkpoint import Checkpointer
from training.config import describe, tokens_per_step
from training.hardware import peak_flops_per_device
from training.metrics import MetricsWriter
from training.step import make_eval_step
from training.trainer import Trainer


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite and the config says to stop (lower the learning rate)."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing the current step, then saving.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class _ProfileWindow:
    """Traces steps [start, start + num_steps) into <workdir>/profile; start=0 turns it off.

    Stops only a trace it started, so a run resumed inside or past the window,
    or one that fails mid-window, never leaves the profiler inconsistent.
    """

    def __init__(self, profile_config, workdir: str):
        self.start = profile_config.start_step
        self.stop = self.start + profile_config.num_steps
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before_step(self, step: int):
        """`step` is the number of the step about to run (1-based)."""
        if self.start > 0 and step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state, last_step: bool):
        if self.active and (step + 1 >= self.stop or last_step):
            jax.block_until_ready(state)
            self.close()

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def evaluate(trainer: Trainer, eval_step, params, eval_stream) -> dict:
    totals = np.zeros(2)
    for batch in eval_stream:
        out = jax.device_get(eval_step(params, trainer.to_global(batch)))
        totals += (out["ce_sum"], out["weight_sum"])
    loss = totals[0] / max(totals[1], 1.0)
    return {
        "eval_loss": float(loss),
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": float(totals[1]),
    }


def _write_config(config, workdir):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def train(config, workdir: str) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config)
    logging.info(
        "%s", describe(config, trainer.model_config, trainer.num_params, jax.device_count())
    )
    train_cfg = config.train
    data_kwargs = dict(
        global_batch_size=train_cfg.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model_vocab_size=trainer.model_config.vocab_size,
    )
    train_iter = make_train_iterator(config.data, seed=config.seed, **data_kwargs)
    eval_stream = make_eval_batches(config.data, **data_kwargs)

    checkpointer = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    model_dict = config.model.to_dict()
    restored = checkpointer.restore_latest(trainer.abstract_state, model_dict)
    if restored is None:
        state = trainer.init_state()
        step = 0
    else:
        state, data_state = restored
        train_iter.set_state(data_state)
        step = int(state.step)
        logging.info("Restored checkpoint at step %d from %s", step, checkpointer.directory)
    _write_config(config, workdir)

    writer = MetricsWriter(workdir)
    eval_step = make_eval_step(trainer.model, trainer.mesh, trainer.rules, trainer.shardings)
    peak_flops, peak_source = peak_flops_per_device(trainer.model_config.dtype)
    logging.info("MFU is relative to %.3g FLOP/s per device (%s)", peak_flops, peak_source)
    preemption = _Preemption()
    num_steps = train_cfg.num_steps
    profiler = _ProfileWindow(config.profile, workdir)
    # The last timed step and when it finished. The first step (compilation) is timed
    # on its own and then left out of later averages.
    clock = {"step": step, "time": time.perf_counter(), "compiled": False}
    last = {}

    def finish(step_done: int, metrics) -> None:
        """Reads step `step_done`'s metrics (blocking until it ran); logs; checks finiteness."""
        nonlocal last
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
            if not train_cfg.skip_nonfinite_updates:
                raise NonFiniteLossError(
                    f"Non-finite loss ({float(metrics['loss'])}) at step {step_done}; stopping. "
                    f"The last good checkpoint (step {checkpointer.latest_step()}) is intact in "
                    f"{checkpointer.directory}. Lower optimizer.learning_rate, or set "
                    "train.skip_nonfinite_updates=True to skip such updates."
                )
            logging.warning("Non-finite loss at step %d: update skipped.", step_done)
        now = time.perf_counter()
        if step_done % train_cfg.log_every and step_done != num_steps:
            if not clock["compiled"]:  # restart the clock after the compiling step
                clock.update(step=step_done, time=now, compiled=True)
            return
        step_time = (now - clock["time"]) / max(step_done - clock["step"], 1)
        tokens_per_second = tokens_per_step(config) / step_time
        loss = float(metrics["loss"])
        last = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "cross_entropy": float(metrics["cross_entropy"]),
            "learning_rate": float(metrics["learning_rate"]),
            "grad_norm": float(metrics["grad_norm"]),
            "param_norm": float(metrics["param_norm"]),
            "num_tokens": float(metrics["num_tokens"]),
            "step_time": step_time,
            "tokens_per_second": tokens_per_second,
            "mfu": trainer.flops_per_token * tokens_per_second / (peak_flops * jax.device_count()),
            "eta_seconds": step_time * (num_steps - step_done),
        }
        writer.write(step_done, last)
        writer.console(step_done, num_steps, last)
        clock.update(step=step_done, time=now, compiled=True)

    pending = None
    try:
        while step < num_steps:
            profiler.before_step(step + 1)
            batch = trainer.to_global(next(train_iter))
            state, metrics = trainer.train_step(state, batch)
            step += 1
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            profiler.after_step(step, state, last_step=step == num_steps)
            every_eval, every_ckpt = train_cfg.eval_every, config.checkpoint.every_steps
            eval_due = step == num_steps or (every_eval and step % every_eval == 0)
            save_due = (
                step == num_steps or preemption.requested or (every_ckpt and step % every_ckpt == 0)
            )
            if eval_due or save_due:
                finish(*pending)  # never save or evaluate past a non-finite loss
                pending = None
            if eval_due:
                eval_metrics = evaluate(trainer, eval_step, state.params, eval_stream)
                writer.write(step, eval_metrics)
                writer.console(step, num_steps, eval_metrics)
                last.update(eval_metrics)
                clock["time"] = time.perf_counter()  # keep eval time out of step times
            if save_due:
                checkpointer.save(step, state, train_iter.get_state(), model_dict, config.seed)
            if preemption.requested:
                logging.info("Preempted: checkpoint saved at step %d; exiting.", step)
                break
        if pending is not None:
            finish(*pending)
    finally:
        profiler.close()
        preemption.restore()
        checkpointer.close()  # waits for asynchronous saves: the last good one reaches disk
        writer.close()
    last["step"] = step
    return last
