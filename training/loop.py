"""The training loop behind train.py: set-up, steps, evaluation, metrics, checkpoints.

The device is kept busy by asynchronous dispatch: step n is queued before the
host reads step n-1's metrics, and the next batch is prepared while step n
runs. The host only waits for the current step when it must: before saving a
checkpoint (so a non-finite loss never reaches the disk) and before evaluating.
"""

import json
import math
import time

import jax
from absl import logging

from data.hf_tokenizer import load_tokenizer
from data.pipeline import make_eval_batches, make_train_iterator
from errors import UserError
from evaluation.evaluator import score_batches
from evaluation.in_training import TrainingTasks
from evaluation.metrics import loss_metrics
from paths import workdir_path
from training.checkpoint import Checkpointer
from training.config import describe, tokens_per_step
from training.hardware import peak_flops_per_device
from training.init_from import initial_checkpoint
from training.metrics import MetricsWriter
from training.preemption import Preemption
from training.step import make_eval_step
from training.trainer import Trainer


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite and the config says to stop (lower the learning rate)."""


class _ProfileWindow:
    """Traces steps [start, start + num_steps) into <workdir>/profile; start=0 turns it off.

    Stops only a trace it started, so a run resumed inside or past the window,
    or one that fails mid-window, never leaves the profiler inconsistent.
    """

    def __init__(self, profile_config, workdir: str):
        self.start = profile_config.start_step
        self.stop = self.start + profile_config.num_steps
        self.directory = str(workdir_path(workdir) / "profile")
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


def evaluate(trainer: Trainer, eval_step, params, eval_stream, tokenizer) -> dict:
    """eval_loss, eval_perplexity, eval_bits_per_byte, ... (evaluation/metrics.py); with
    data.mixture, over every source's eval windows together, and eval_loss_<source>."""
    score = lambda batches: score_batches(eval_step, trainer.to_global, params, batches, tokenizer)
    sources = getattr(eval_stream, "sources", None)  # data.mixture's streams, by name
    if sources is None:
        return {f"eval_{name}": value for name, value in score(eval_stream).items()}
    scores = {name: score(stream) for name, stream in sources.items()}
    total = lambda key: sum(m[key] for m in scores.values())
    ce_sum = sum(m["loss"] * m["tokens"] for m in scores.values())
    metrics = loss_metrics(ce_sum, total("tokens"), total("bytes"))
    return {
        **{f"eval_{name}": value for name, value in metrics.items()},
        **{f"eval_loss_{name}": m["loss"] for name, m in scores.items()},
    }


class StepClock:
    """Seconds per train step between two reports, leaving out compilation, evaluation and saves.

    `restart(step)` after anything that is not training (the compiling first step,
    an evaluation, a checkpoint save): the next report divides only the time since
    then by only the steps since then.
    """

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int):
        self.step, self.time = step, now()

    def seconds_per_step(self, step: int) -> float:
        seconds = (now() - self.time) / max(step - self.step, 1)
        self.restart(step)
        return seconds


def now() -> float:
    return time.perf_counter()


def _write_config(config, workdir):
    if jax.process_index() == 0:
        (workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(config, workdir: str, hold: list | None = None) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the last logged metrics.

    Everything is validated (config fields, data files, tokenizer, the step's memory)
    before anything is written to `workdir`. `hold`, if given, receives the data streams, so that a
    caller about to exit can skip their teardown: destroying a tf.data iterator
    waits for the tokenization in flight (4-8 s seen after a SIGTERM).
    """
    trainer = Trainer(config)
    train_cfg = config.train
    data_kwargs = dict(
        global_batch_size=train_cfg.global_batch_size,
        process_index=trainer.feed_index,  # processes along mesh.stage feed the same rows
        process_count=trainer.feed_count,
        model_vocab_size=trainer.model_config.vocab_size,
        train_config=train_cfg,  # its objective transforms the batches (data/objectives.py)
        encoder_seq_len=trainer.encoder_seq_len,  # an encoder-decoder's batches: encoder fields
    )
    train_iter = make_train_iterator(config.data, seed=config.seed, **data_kwargs)
    eval_stream = make_eval_batches(config.data, **data_kwargs)
    tasks = TrainingTasks(config, trainer)  # config.eval's files, read before anything is written
    if hold is not None:
        hold.extend([train_iter, eval_stream])
    logging.info(
        "%s", describe(config, trainer.model_config, trainer.num_params, jax.device_count())
    )
    train_step = trainer.checked_train_step()  # a step that does not fit stops here
    train_step = trainer.teacher_step(train_step)  # distillation: the teacher's params read

    workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    config_dict = json.loads(config.to_json_best_effort())
    model_dict = trainer.model_config.weight_fields()
    try:
        restored = checkpointer.restore_latest(
            trainer.abstract_state,
            config_dict,
            model_dict,
            allow_optimizer_reset=config.checkpoint.allow_optimizer_reset,
        )
        source = checkpointer.directory
        if restored is None and train_cfg.init_from:  # fine-tuning: params only, fresh optimizer
            source = f"train.init_from={train_cfg.init_from}"
            restored = initial_checkpoint(train_cfg, trainer.abstract_model_params, model_dict)
        elif train_cfg.init_from:
            logging.info("train.init_from ignored: the workdir has checkpoints; resuming them.")
    except BaseException:
        checkpointer.close()
        raise
    if restored is None:
        state, step = trainer.init_state(), 0
    else:
        state, step = trainer.resumed_state(restored), restored.step
        if restored.data_state is not None:  # None: a params-only step, the data starts over
            train_iter.set_state(restored.data_state)
        logging.info("Restored checkpoint at step %d from %s", step, source)
    _write_config(config, workdir)

    writer = MetricsWriter(workdir, config)
    eval_step = make_eval_step(trainer.model, trainer.mesh, trainer.rules, trainer.model_shardings)
    tokenizer = load_tokenizer(config.data.tokenizer)
    peak_flops, peak_source = peak_flops_per_device(trainer.model_config.dtype)
    logging.info(
        "MFU: model FLOPs (%.4g per token: causal attention counted in full, PaLM's convention; "
        "recomputation not counted; model/flops.py), relative to %.3g FLOP/s per device (%s)",
        trainer.flops_per_token,
        peak_flops,
        peak_source,
    )
    preemption = Preemption()
    num_steps = train_cfg.num_steps
    profiler = _ProfileWindow(config.profile, workdir)
    clock = StepClock(step)
    compiled = False  # the first step compiles: it is timed on its own, then left out
    last = {}

    def finish(step_done: int, metrics) -> None:
        """Reads step `step_done`'s metrics (blocking until it ran); logs; checks finiteness."""
        nonlocal last, compiled
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
        if step_done % train_cfg.log_every and step_done != num_steps:
            if not compiled:
                clock.restart(step_done)
                compiled = True
            return
        compiled = True
        step_time = clock.seconds_per_step(step_done)
        tokens_per_second = tokens_per_step(config) / step_time
        cross_entropy = float(metrics["cross_entropy"])
        last = {
            "loss": float(metrics["loss"]),
            "cross_entropy": cross_entropy,
            "perplexity": math.exp(min(cross_entropy, 50.0)),
            "learning_rate": float(metrics["learning_rate"]),
            "grad_norm": float(metrics["grad_norm"]),
            "param_norm": float(metrics["param_norm"]),
            "num_tokens": float(metrics["num_tokens"]),
            "step_time": step_time,
            "tokens_per_second": tokens_per_second,
            "mfu": trainer.flops_per_token * tokens_per_second / (peak_flops * jax.device_count()),
            "eta_seconds": step_time * (num_steps - step_done),
        }
        # What a run's options add (distill_kl, loss_scale and skipped_steps, moe_*, the
        # mixture's tokens_<source>) is logged as the step or the data reported it.
        last.update({k: float(v) for k, v in metrics.items() if k not in last and k != "finite"})
        writer.write(step_done, last)
        writer.console(step_done, num_steps, last)

    source_tokens = getattr(train_iter, "source_tokens", dict)  # host-side counts
    pending = None
    preempted = False
    try:
        while step < num_steps:
            profiler.before_step(step + 1)
            batch = trainer.to_global(next(train_iter))
            state, metrics = train_step(state, batch)
            metrics = {**metrics, **source_tokens()}  # data.mixture: tokens_<source> so far
            step += 1
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            profiler.after_step(step, state, last_step=step == num_steps)
            every_eval, every_ckpt = train_cfg.eval_every, config.checkpoint.every_steps
            if step == num_steps or (every_eval and step % every_eval == 0):
                finish(*pending)  # never evaluate past a non-finite loss
                pending = None
                params = trainer.model_params(state.params)  # LoRA: base + adapters merged
                eval_metrics = evaluate(trainer, eval_step, params, eval_stream, tokenizer)
                eval_metrics.update(tasks(params, step))
                writer.write(step, eval_metrics)
                writer.console(step, num_steps, eval_metrics)
                last.update(eval_metrics)
                clock.restart(step)
            # Asked after evaluating, so a SIGTERM that arrived during evaluation saves too.
            preempted = preemption.reached(step)
            if step == num_steps or preempted or (every_ckpt and step % every_ckpt == 0):
                if pending is not None:
                    finish(*pending)  # never save past a non-finite loss
                    pending = None
                checkpointer.save(step, state, train_iter.get_state(), config_dict, model_dict)
                clock.restart(step)
            if preempted:
                break
        if pending is not None:
            finish(*pending)
    finally:
        profiler.close()
        preemption.close()
        checkpointer.close()  # waits for asynchronous saves: the last good one reaches disk
        writer.close()
    if preempted:
        if checkpointer.latest_step() == step:
            # A warning, so that every host of a multi-host run confirms its save.
            logging.warning("Preempted at step %d: checkpoint saved; exiting.", step)
        else:
            logging.error("Preempted at step %d, but no checkpoint was saved.", step)
    last["step"] = step
    return last
