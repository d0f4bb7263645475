"""What `python -m data.tokenizer` trains on: 'stdlib', comma-separated file globs, or a
TFDS dataset already prepared on this machine, each checked before anything is read (a
UserError names the flag), then read lazily as documents through data.sources."""

import glob
import logging
import os
from typing import Iterator

from data.config import default_data_config
from errors import UserError


def source_texts(
    source: str,
    *,
    file_format: str = "document",
    tfds_split: str = "train",
    tfds_text_key: str = "text",
    tfds_data_dir: str = "",
) -> Iterator[str]:
    """Training documents of 'stdlib', comma-separated globs, or 'tfds:NAME', via data.sources.

    The source is checked now (a UserError names the flag); its documents are read lazily.
    """
    cfg = default_data_config()
    if source == "stdlib":
        cfg.source = "stdlib"
    elif source.startswith("tfds:"):
        name = source[len("tfds:") :]
        check_tfds_input(name, tfds_split, tfds_text_key, tfds_data_dir)
        cfg.update(
            source="tfds",
            tfds_name=name,
            tfds_train_split=tfds_split,
            tfds_text_key=tfds_text_key,
            tfds_data_dir=tfds_data_dir,
        )
    else:
        check_input_files(source)
        cfg.update(source="files", train_files=source, file_format=file_format)
    return _documents(cfg)


def _documents(cfg) -> Iterator[str]:
    from data import sources  # imports TensorFlow; only the command needs it

    for _, text in sources.documents(cfg, "train").as_numpy_iterator():
        yield text.decode("utf-8", errors="replace")


def check_input_files(globs: str) -> None:
    """Raises UserError unless every one of the comma-separated `globs` matches readable files."""
    patterns = [g.strip() for g in globs.split(",") if g.strip()]
    if not patterns:
        raise UserError(
            "--input: empty; give 'stdlib', comma-separated file globs, or 'tfds:NAME'."
        )
    for pattern in patterns:
        files = [p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p)]
        if not files:
            raise UserError(
                f"--input: no files match {pattern!r}; check the glob "
                "(or give 'stdlib' or 'tfds:NAME')."
            )
        for path in files:
            if not os.access(path, os.R_OK):
                raise UserError(f"--input: cannot read {path!r}; check its permissions.")


def check_tfds_input(name: str, split: str, text_key: str, data_dir: str) -> None:
    """Raises UserError unless TFDS dataset `name` is prepared locally, with `split` and `text_key`.

    Never downloads anything: the command reads only a dataset that is already prepared.
    """
    import tensorflow_datasets as tfds  # imported lazily: slow, and only needed here

    flag = f"--input=tfds:{name}"
    if not name:
        raise UserError(f"{flag}: give a dataset name, e.g. --input=tfds:lm1b.")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # tfds raises several types (DatasetNotFoundError, ...)
        raise UserError(
            f"{flag}: no such TFDS dataset ({_first_line(error)}); "
            "check the name and --tfds_data_dir."
        ) from None
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # is_prepared() warns about each missing version folder
    try:
        prepared = builder.is_prepared()
    finally:
        absl_log.setLevel(level)
    if not prepared:
        raise UserError(
            f"{flag}: not prepared in {builder.data_dir!r}, and this command does not download; "
            f"prepare it first (`tfds build {name} --data_dir=DIR`) or set --tfds_data_dir to "
            "the directory that holds it."
        )
    features = builder.info.features
    if text_key not in features:
        raise UserError(
            f"--tfds_text_key={text_key!r}: not a feature of {name!r}; "
            f"its features are {sorted(features.keys())}."
        )
    try:
        builder.info.splits[split]  # parses slices too, e.g. train[:10%]
    except Exception as error:  # tfds raises ValueError or KeyError
        raise UserError(f"--tfds_split={split!r}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
