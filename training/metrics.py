"""Where metrics go: a console line a person can watch, `metrics.jsonl` for scripts
and sweeps (one JSON object per logged step), and TensorBoard event files.

Only process 0 writes; every process may call.
"""

import json
import math

import jax
import tensorflow as tf
from absl import logging

from paths import workdir_path


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            workdir = workdir_path(workdir)
            self.jsonl = (workdir / "metrics.jsonl").open("a")
            self.tensorboard = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict):
        """Writes one step's scalars (floats) to all three sinks."""
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        with self.tensorboard.as_default(step=step):
            for name, value in record.items():
                if name != "step":
                    tf.summary.scalar(name, value)
        self.tensorboard.flush()

    def console(self, step: int, num_steps: int, metrics: dict):
        if not self.enabled:
            return
        if "eval_loss" in metrics:
            logging.info(
                "step %d/%d  eval_loss %.4f  eval_perplexity %.2f",
                step,
                num_steps,
                metrics["eval_loss"],
                metrics["eval_perplexity"],
            )
            return
        logging.info(
            "step %d/%d  loss %.4f  ppl %.2f  lr %.2e  grad_norm %.3f  %.0f tok/s  MFU %.1f%%  "
            "%.0f ms/step  ETA %s",
            step,
            num_steps,
            metrics["loss"],
            metrics["perplexity"],
            metrics["learning_rate"],
            metrics["grad_norm"],
            metrics["tokens_per_second"],
            100 * metrics["mfu"],
            1000 * metrics["step_time"],
            _format_duration(metrics["eta_seconds"]),
        )

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
