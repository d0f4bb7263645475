"""Where metrics go: a console line a person can watch, `metrics.jsonl` for scripts
and sweeps (one JSON object per logged step, always written), and the trackers that
`train.trackers` names: TensorBoard event files (the default) and Weights & Biases.

A tracker's package is imported only when it is selected, so a run without W&B never
loads it and TensorBoard's files are written without TensorFlow. A tracker that fails
(at start or mid-run: its directory unwritable, its service down, a bug in it) is dropped
with one warning and the run goes on: metrics.jsonl and the other trackers keep every step.

Only process 0 writes; every process may call.
"""

import importlib.util
import itertools
import json
import math
import os
import socket
import time

import jax
from absl import logging

from errors import UserError
from paths import workdir_path

TRACKERS = ("tensorboard", "wandb")
_EVENT_FILES = itertools.count()  # TensorBoard's file names: unique within a process


def parse_trackers(text: str) -> tuple[str, ...]:
    """train.trackers' names; an unknown one, or one whose package is missing, is refused."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise UserError(
                f"train.trackers={text!r}: unknown tracker {name!r}; give a comma-separated "
                f"list of {', '.join(TRACKERS)} ('' = metrics.jsonl only)."
            )
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError(
            f"train.trackers={text!r}: wandb is not installed; pip install wandb "
            "(or drop wandb from train.trackers)."
        )
    return names


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class TensorBoardTracker:
    """Scalars as TensorBoard event files in <workdir>/tensorboard, one event per logged step.

    Written with the `tensorboard` package's protos and record format, through epath (so a
    gs:// workdir works): TensorFlow's own writer would cost seconds of TensorFlow import.
    The records are the ones tf.summary.scalar writes (the scalars plugin's tensor summaries).
    """

    name = "tensorboard"

    def __init__(self, workdir, config: dict):
        del config  # TensorBoard shows scalars only
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.scalar import summary_v2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._scalar = event_pb2.Event, summary_v2.scalar_pb
        directory = workdir / "tensorboard"
        directory.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_EVENT_FILES)}.v2"
        )
        self._file = RecordWriter((directory / name).open("wb"))
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._file.write(event.SerializeToString())
        self._file.flush()

    def log(self, step: int, metrics: dict):
        event = self._event(wall_time=time.time(), step=step)
        for name, value in metrics.items():
            event.summary.value.extend(self._scalar(name, value).value)
        self._write(event)

    def close(self):
        self._file.close()


class WandbTracker:
    """A Weights & Biases run: the config once at start, then every metrics.jsonl record.

    The run's id is kept in <workdir>/wandb_run_id, so that a resumed run continues the same
    W&B run; steps that it logs again after resuming are below W&B's last step, and W&B keeps
    the first values (a bitwise resume logs the same ones). W&B's own settings come from its
    environment variables (WANDB_MODE=offline, WANDB_DIR, WANDB_ENTITY, ...).
    """

    name = "wandb"

    def __init__(self, workdir, config: dict):
        import wandb

        id_file = workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        train = config["train"]
        self._run = wandb.init(
            project=train["tracker_project"] or None,
            name=train["run_name"] or workdir.name,
            id=run_id,
            resume="allow",
            config=config,
            reinit="create_new",  # several runs in one process: the trials of --vectorized
        )
        id_file.write_text(self._run.id)

    def log(self, step: int, metrics: dict):
        self._run.log(metrics, step=step)

    def close(self):
        self._run.finish()


_TRACKER_CLASSES = {cls.name: cls for cls in (TensorBoardTracker, WandbTracker)}


class MetricsWriter:
    """metrics.jsonl and `config.train.trackers` for one run (`config` None: TensorBoard only)."""

    def __init__(self, workdir: str, config=None):
        self.enabled = jax.process_index() == 0
        self.trackers = []
        if not self.enabled:
            return
        workdir = workdir_path(workdir)
        self.jsonl = (workdir / "metrics.jsonl").open("a")
        names = parse_trackers(config.train.trackers) if config else ("tensorboard",)
        config_dict = json.loads(config.to_json_best_effort()) if config else {}
        for name in names:
            cls = _TRACKER_CLASSES[name]
            self._guarded(name, lambda cls=cls: self.trackers.append(cls(workdir, config_dict)))

    def _guarded(self, name: str, call) -> None:
        """Runs a tracker's `call`; on any error drops that tracker with one warning."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a tracker never stops the run
            self.trackers = [t for t in self.trackers if t.name != name]
            logging.warning(
                "Tracker %s failed and is dropped; the run goes on (metrics.jsonl keeps every "
                "step): %s: %s",
                name,
                type(error).__name__,
                error,
            )

    def write(self, step: int, metrics: dict):
        """Writes one step's scalars (floats) to metrics.jsonl and every tracker."""
        if not self.enabled:
            return
        record = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for tracker in list(self.trackers):
            self._guarded(tracker.name, lambda tracker=tracker: tracker.log(step, record))

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
        if not self.enabled:
            return
        self.jsonl.close()
        for tracker in list(self.trackers):
            self._guarded(tracker.name, tracker.close)
        self.trackers = []
