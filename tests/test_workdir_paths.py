"""Workdirs on a non-local filesystem: `--workdir=gs://bucket/run` with GCS served offline.

No network here, so the `fake_gcs` fixture serves `gs://` from a local directory at
the two places the bytes leave Python: etils.epath's backend for gs:// paths
(config.json, metrics.jsonl, TensorBoard's event files, sweep files, orbax's own
directory and JSON I/O) and TensorStore's kvstore spec for gs:// (orbax's arrays).
Everything above them runs unchanged and sees only
`gs://...` strings, so a code path that treats the workdir as a local path (os.path,
open, shutil) writes under the working directory instead, into `./gs:/...`, which
the tests look for.
"""

import json
import os
import sys

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from checkpoints.read import newest_step_meta
from data.hf_tokenizer import load_tokenizer
from tests.test_train_loop import small_config
from tools import export_hf, import_hf
from training import loop, sweep_summary, sweeps
from training.metrics import MetricsWriter

WORKDIR = "gs://bucket/run"


class _LocalBucket(epath_backend._OsPathBackend):
    """epath's backend for gs:// paths, storing `gs://b/x` at `<root>/b/x`."""

    def __init__(self, root: str):
        self.root = root

    def local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith("gs://"):  # the other side of a copy, or the backend's own calls
            return path
        return os.path.join(self.root, path.removeprefix("gs://"))

    def uri(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root)

    def open(self, path, mode):
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down):
            yield self.uri(os.fspath(root)), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=0o777):
        super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=0o777):
        super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):
        super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """The bucket's local root; the working directory is an empty `cwd` beside it."""
    root = tmp_path / "gcs"
    root.mkdir()
    bucket = _LocalBucket(str(root))
    os_backend = epath_backend.os_backend
    monkeypatch.setattr(
        gpath._GPath,
        "_backend",
        property(lambda path: bucket if path._uri_scheme == "gs" else os_backend),
    )

    monkeypatch.setattr(gpath, "_GCS_BACKENDS", frozenset({bucket}))  # copies between the two

    def kvstore(path):  # TensorStore: a file driver instead of its gcs driver
        return {"driver": "file", "path": bucket.local(path)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return root


def _steps(directory) -> list[int]:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_training_resume_and_set_aside_on_a_gs_workdir(fake_gcs):
    run = fake_gcs / "bucket" / "run"
    config = small_config(
        **{"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0}
    )
    loop.train(config, WORKDIR)
    assert os.listdir(".") == []  # nothing local, no ./gs:
    assert json.loads((run / "config.json").read_text())["train"]["num_steps"] == 6
    records = sweeps.read_metrics(WORKDIR)  # what sweep summaries read
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _steps(run / "checkpoints") == [3, 6]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert newest_step_meta(WORKDIR)[0] == 6  # what sample.py and eval.py read

    # Step 6 made unreadable: set aside on the bucket, training resumes from step 3.
    for path in (run / "checkpoints" / "6" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    config.train.num_steps = 8
    assert loop.train(config, WORKDIR)["step"] == 8
    assert os.listdir(".") == []
    assert [p.name[:2] for p in (run / "checkpoints_unreadable").iterdir()] == ["6-"]
    assert _steps(run / "checkpoints") == [3, 6, 8]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]  # appended to, from step 3 on

    # Fine-tuning from it (train.init_from): its params read from the bucket.
    config.train.update(init_from=WORKDIR, num_steps=2)
    assert loop.train(config, "gs://bucket/tuned")["step"] == 2
    assert _steps(fake_gcs / "bucket" / "tuned" / "checkpoints") == [2]
    assert os.listdir(".") == []

    # Hugging Face export from the bucket, and import of the result into another gs:// workdir
    # (its tokenizer copied there, read back from there).
    hf_dir = str(fake_gcs.parent / "hf")
    export_hf.export_hf(WORKDIR, hf_dir, 2**30)
    import_hf.import_hf(hf_dir, "gs://bucket/imported", "float32", "float32")
    step, meta = newest_step_meta("gs://bucket/imported")
    assert step == 0 and meta["config"]["data"]["tokenizer"].startswith("gs://bucket/imported/")
    assert load_tokenizer(meta["config"]["data"]["tokenizer"]).encode("def f():")
    imported = fake_gcs / "bucket" / "imported"
    assert {"config.json", "checkpoints", "tokenizer"} <= {p.name for p in imported.iterdir()}
    assert os.listdir(".") == []


def test_sweep_files_on_a_gs_workdir(fake_gcs):
    sweep = "gs://bucket/sweep"
    named = {"learning_rate=0.1": {"optimizer.learning_rate": 0.1}}
    sweeps.write_sweep(sweep, named)
    trial = f"{sweep}/learning_rate=0.1"
    sweeps.write_status(trial, "interrupted")  # as training/vectorized.py does first
    writer = MetricsWriter(trial)
    writer.write(1, {"loss": 2.0, "tokens_per_second": 10.0})
    writer.write(1, {"eval_loss": 1.5})
    writer.close()
    sweeps.write_status(trial, "done")
    lines = sweep_summary.summarize(sweep)
    assert os.listdir(".") == []
    assert sweeps.read_status(trial)["status"] == "done"
    assert any("1.5" in line for line in lines), lines
    written = {p.name for p in (fake_gcs / "bucket" / "sweep").iterdir()}
    assert {"sweep.json", "summary.csv", "summary.md", "summary.png"} <= written


def test_a_trial_process_logs_to_a_gs_trial_directory(fake_gcs):
    trial = "gs://bucket/sweep/trial"
    fails = [sys.executable, "-c", "print('step 1'); print('error: no data'); raise SystemExit(3)"]
    assert sweeps.run_logged(fails, trial, cwd=".") == (3, "error: no data (exit code 3)")
    assert sweeps.run_logged([sys.executable, "-c", "print('ok')"], trial, cwd=".") == (0, "")
    log = (fake_gcs / "bucket" / "sweep" / "trial" / "train.log").read_text()
    assert log == "step 1\nerror: no data\nok\n"
    assert os.listdir(".") == []
