"""Text sources behind one interface: a tf.data stream of (origin, text) documents.

Three sources, chosen by `data.source`:
  * "stdlib": the running interpreter's standard library `.py` files (one file =
    one document), split train/validation by a hash of the relative path, so the
    default config trains offline anywhere;
  * "files": local text files by comma-separated globs, read as one document per
    file, per line, or per blank-line-separated paragraph (`data.file_format`);
  * "tfds": any TFDS dataset by name, split and text feature key.

`origin` (a file path or "tfds:name/split") lets the pipeline name the file that
held invalid UTF-8. The token cache (data.prepare) reads a whole split; the
stream pipeline shards it over processes here, before any tokenization: files by
index (documents by index when there are fewer files than processes), TFDS
splits by `tfds.even_splits`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sysconfig

import numpy as np

from errors import UserError
from startup import LazyTensorFlow

tf = LazyTensorFlow()  # imported at first use: a run from a token cache never needs it
tf_text = LazyTensorFlow("tensorflow_text")

STDLIB_EVAL_PERCENT = 3  # of stdlib files, chosen by path hash

log = logging.getLogger(__name__)


class InvalidUtf8Report:
    """Counts documents whose invalid UTF-8 bytes were replaced by U+FFFD; warns once.

    The count and the first offending file live in TensorFlow variables updated
    inside the tf.data graph, and the warning is logged by the Python side that
    reads batches (`warn_once`). A Python callback inside the pipeline
    (`tf.py_function`) once made destroying the iterator wait 4-37 s for the GIL,
    which delayed every exit and preemption.
    """

    def __init__(self):
        self._count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._first = tf.Variable("", dtype=tf.string, trainable=False)
        self._warned = False

    def record(self, origins: tf.Tensor, invalid: tf.Tensor) -> list[tf.Operation]:
        """Graph ops that add this batch of documents to the report."""
        bad = tf.boolean_mask(origins, invalid)
        remember = tf.cond(
            tf.logical_and(tf.size(bad) > 0, tf.equal(self._first, "")),
            lambda: self._first.assign(bad[0]).read_value(),
            lambda: self._first.read_value(),
        )
        return [remember, self._count.assign_add(tf.size(bad, out_type=tf.int64))]

    @property
    def count(self) -> int:
        return int(self._count.numpy())

    def warn_once(self) -> None:
        if not self._warned and self.count:
            self._warned = True
            log.warning(
                "invalid UTF-8 in %s: bytes replaced by U+FFFD (further documents are only counted, "
                "see invalid_utf8_documents on the stream)",
                self._first.numpy().decode(errors="replace"),
            )


def clean_utf8(origins: tf.Tensor, texts: tf.Tensor, report: InvalidUtf8Report) -> tf.Tensor:
    """Replaces invalid UTF-8 in a batch of documents, telling `report` where."""
    cleaned = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace")
    with tf.control_dependencies(report.record(origins, tf.not_equal(cleaned, texts))):
        return tf.identity(cleaned)


def clean_documents(origins: tf.Tensor, texts: tf.Tensor, report: InvalidUtf8Report) -> tf.Tensor:
    """A batch of documents as both pipelines tokenize them: valid UTF-8, empty ones dropped."""
    texts = clean_utf8(origins, texts, report)
    return tf.boolean_mask(texts, tf.strings.length(tf.strings.strip(texts)) > 0)


def stdlib_files(split: str) -> list[str]:
    """The stdlib's .py files (no site-packages) in `split`: 'train' or 'eval'."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).encode()
                is_eval = int(hashlib.sha256(rel).hexdigest(), 16) % 100 < STDLIB_EVAL_PERCENT
                if is_eval == (split == "eval"):
                    files.append(path)
    if not files:
        raise UserError(
            f"data.source='stdlib': no .py files found under {root!r}. Set data.source to 'files' or 'tfds'."
        )
    return files


def expand_globs(globs: str, field: str) -> list[str]:
    """Sorted files matching comma-separated `globs`; a clear error when none match."""
    patterns = [g.strip() for g in globs.split(",") if g.strip()]
    if not patterns:
        raise UserError(f"{field}: empty. Give comma-separated file globs, or set data.source.")
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matched:
            raise UserError(
                f"{field}: no files match {pattern!r}. Check the glob or set data.source."
            )
        files.extend(matched)
    return sorted(set(files))


def _shard(items: list, process_index: int, process_count: int) -> list:
    return items[process_index::process_count]


def _file_documents(files: list[str], file_format: str) -> tf.data.Dataset:
    """(path, text) per document, in the order of `files`."""
    paths = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
    if file_format == "lines":
        return paths.flat_map(lambda p: tf.data.TextLineDataset(p).map(lambda line: (p, line)))
    docs = paths.map(lambda p: (p, tf.io.read_file(p)))
    if file_format == "paragraphs":

        def paragraphs(
            text,
        ):  # split at blank lines; the file's trailing newlines end the last paragraph
            text = tf.strings.regex_replace(text, r"\s+$", "")
            return tf_text.regex_split(tf.reshape(text, [1]), r"\n\s*\n").flat_values

        docs = docs.flat_map(
            lambda p, text: tf.data.Dataset.from_tensor_slices(paragraphs(text)).map(
                lambda d: (p, d)
            )
        )
    return docs


def _tfds_documents(cfg, split: str, process_index: int, process_count: int, shuffle_seed):
    import tensorflow_datasets as tfds  # imported lazily: slow, and only needed here

    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir or None)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, ...)
        reason = str(e).splitlines()[0]  # tfds appends the list of all dataset names
        raise UserError(
            f"data.tfds_name: cannot find TFDS dataset {cfg.tfds_name!r} ({reason}). "
            "Check the name and data.tfds_data_dir."
        ) from e
    if not builder.is_prepared():
        builder.download_and_prepare()
    features = builder.info.features
    if cfg.tfds_text_key not in features:
        raise UserError(
            f"data.tfds_text_key: {cfg.tfds_text_key!r} is not a feature of {cfg.tfds_name!r}; "
            f"its features are {sorted(features.keys())}."
        )
    field = "data.tfds_train_split" if split == "train" else "data.tfds_eval_split"
    split_name = cfg.tfds_train_split if split == "train" else cfg.tfds_eval_split
    base = split_name.split("[")[0]
    if base not in builder.info.splits:
        splits = sorted(builder.info.splits)
        raise UserError(
            f"{field}: {split_name!r} is not a split of {cfg.tfds_name!r}; it has {splits}."
        )
    subsplit = tfds.even_splits(split_name, n=process_count)[process_index]
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=1)
    ds = builder.as_dataset(
        split=subsplit, shuffle_files=shuffle_seed is not None, read_config=read_config
    )
    origin = tf.constant(f"tfds:{cfg.tfds_name}/{split_name}")
    return ds.map(lambda ex: (origin, ex[cfg.tfds_text_key]))


def documents(
    cfg, split: str, *, process_index: int = 0, process_count: int = 1, shuffle_seed=None
) -> tf.data.Dataset:
    """This process's disjoint share of `split` ('train' or 'eval') as (origin, text).

    With `shuffle_seed`, the order of files (or TFDS shards) is shuffled by it;
    the pipeline passes a different seed every epoch.
    """
    if cfg.source == "tfds":
        return _tfds_documents(cfg, split, process_index, process_count, shuffle_seed)
    if cfg.source == "stdlib":
        files, file_format = stdlib_files(split), "document"
    else:
        field = "data.train_files" if split == "train" else "data.eval_files"
        globs = cfg.train_files if split == "train" else cfg.eval_files
        files, file_format = expand_globs(globs, field), cfg.file_format
    by_file = len(files) >= process_count
    if by_file:
        files = _shard(files, process_index, process_count)
    if shuffle_seed is not None:
        files = [files[i] for i in np.random.default_rng(shuffle_seed).permutation(len(files))]
    docs = _file_documents(files, file_format)
    return docs if by_file else docs.shard(process_count, process_index)
