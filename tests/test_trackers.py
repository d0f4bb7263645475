"""train.trackers: W&B (offline, no network) and TensorBoard receive what metrics.jsonl has;
a tracker that fails mid-run costs one warning, not the run; unselected trackers are never
imported; a missing package or an unknown tracker is refused by name."""

import glob
import json
import logging
import os
import struct
import subprocess
import sys

import pytest

from errors import UserError
from tests.test_train_loop import REPO, checkpoint_steps, small_config
from training import loop, metrics
from training.config import TrainConfig


def _jsonl(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _by_step(records) -> dict[int, dict]:
    """step -> every metric logged at it (a train record and an eval record share a step)."""
    merged = {}
    for record in records:
        merged.setdefault(int(record["step"]), {}).update(record)
    return merged


def _wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log chunks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_run(wandb_dir) -> tuple[list[dict], list[dict]]:
    """(the config of every run record, the history rows) over W&B's offline runs."""
    import wandb

    wandb.teardown()  # W&B's service may still be writing what a finished run logged: wait
    configs, rows = [], []
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "*.wandb"))):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run" and record.run.config.update:
                update = record.run.config.update
                configs.append({_key(u): json.loads(u.value_json) for u in update})
            elif kind == "config":
                configs.append({_key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                rows.append({_key(i): json.loads(i.value_json) for i in record.history.item})
    return configs, rows


def _tensorboard(workdir) -> dict[int, dict]:
    """step -> scalars, as TensorBoard's own reader loads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    steps = {}
    for tag in events.Tags()["tensors"]:
        for event in events.Tensors(tag):
            steps.setdefault(event.step, {})[tag] = float(make_ndarray(event.tensor_proto))
    return steps


def _close(logged: dict, expected: dict):
    """Every metric of `expected` (floats) in `logged`, to float32 (TensorBoard's precision)."""
    assert set(expected) <= set(logged), set(expected) - set(logged)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-6, abs=1e-30), name


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without network: its offline runs under tmp_path/wandb."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports sent either
    wandb.teardown()  # W&B reads its environment once per process setup: this test's, then
    yield tmp_path
    wandb.teardown()  # and its service process goes


def test_wandb_gets_every_json_metric_when_tensorboard_fails_mid_run(
    wandb_offline, monkeypatch, caplog
):
    """One run for both: W&B receives the config once and every metric of metrics.jsonl;
    TensorBoard's disk fills at step 3: one warning, and the run, its metrics.jsonl, its
    checkpoints and W&B go on."""
    write = metrics.TensorBoardTracker.log

    def disk_full_from_step_3(self, step, record):
        if step >= 3:
            raise OSError(28, "No space left on device")
        write(self, step, record)

    monkeypatch.setattr(metrics.TensorBoardTracker, "log", disk_full_from_step_3)
    workdir = str(wandb_offline / "run")
    config = small_config(
        **{
            "train.num_steps": 4,
            "train.eval_every": 2,
            "checkpoint.every_steps": 2,
            "train.trackers": "tensorboard,wandb",
            "train.tracker_project": "tracker-test",
        }
    )
    with caplog.at_level(logging.WARNING):
        result = loop.train(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if "Tracker" in r.getMessage()]
    assert len(warnings) == 1 and "tensorboard" in warnings[0], warnings
    assert "No space left on device" in warnings[0]
    assert result["step"] == 4 and checkpoint_steps(workdir) == [2, 4]
    in_json = _by_step(_jsonl(workdir))
    assert sorted(in_json) == [1, 2, 3, 4]
    assert "eval_loss" in in_json[2] and "eval_loss" in in_json[4]

    configs, rows = _wandb_run(wandb_offline)
    assert len(configs) == 1  # once, whole and nested as config.json has it
    with open(os.path.join(workdir, "config.json")) as f:
        assert configs[0]["model"] == json.load(f)["model"]
    assert configs[0]["train"]["trackers"] == "tensorboard,wandb"
    in_wandb = _by_step({"step": row["_step"], **row} for row in rows)
    for step, record in in_json.items():
        _close(in_wandb[step], record)

    in_tensorboard = _tensorboard(workdir)  # what it wrote before failing stays readable
    assert sorted(in_tensorboard) == [1, 2]
    for step in (1, 2):
        _close(in_tensorboard[step], {k: v for k, v in in_json[step].items() if k != "step"})


def test_a_resumed_run_continues_its_wandb_run(wandb_offline):
    config = small_config(**{"train.trackers": "wandb"})
    workdir = wandb_offline / "run"
    workdir.mkdir()
    run_ids = []
    for step in (1, 2):  # two starts in the same workdir, as a resume makes
        writer = metrics.MetricsWriter(str(workdir), config)
        writer.write(step, {"loss": 1.0 / step})
        writer.close()
        run_ids.append((workdir / "wandb_run_id").read_text())
    runs = glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))
    # offline-run-<time>-<run id>, and "-1" after it when both starts fall in the same second
    ids = {os.path.basename(r).split("-")[3] for r in runs}
    assert run_ids[0] == run_ids[1] and ids == {run_ids[0]}


def test_unselected_trackers_are_not_imported(tmp_path):
    """Neither W&B nor TensorFlow is loaded by metrics.jsonl and TensorBoard's files."""
    code = (
        "import sys\n"
        "from ml_collections import ConfigDict\n"
        "from training.metrics import MetricsWriter\n"
        "config = ConfigDict({'train': {'trackers': 'tensorboard'}})\n"
        f"writer = MetricsWriter({str(tmp_path)!r}, config)\n"
        "writer.write(1, {'loss': 2.0})\n"
        "writer.close()\n"
        "print(sorted(m for m in ('wandb', 'tensorflow') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_a_missing_package_or_unknown_tracker_is_refused_by_name(monkeypatch):
    assert TrainConfig(trackers=" tensorboard, wandb ,").trackers  # spaces, a trailing comma
    assert metrics.parse_trackers("") == ()
    with pytest.raises(UserError, match=r"train.trackers='tensorboard,mlflow': unknown tracker"):
        TrainConfig(trackers="tensorboard,mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"train.trackers='wandb': .*pip install wandb"):
        TrainConfig(trackers="wandb")
