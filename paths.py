"""Workdir paths: a local directory or any filesystem that etils.epath (and so orbax)
supports, e.g. `--workdir=gs://bucket/run`. Below every package: training, checkpoints
and the tools all write workdirs.

All workdir I/O (config.json, metrics.jsonl, TensorBoard, checkpoints, the
set-aside directory, sweep trial directories) goes through `epath.Path`;
`os.path.abspath` would turn `gs://b/run` into a local directory `./gs:/b/run`.
"""

import os

from etils import epath


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URI (`gs://b/run`) as given, a local path made absolute."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))
