"""The data config shared by configs/*.py, train.py and the tests, and its error type."""

import ml_collections

from errors import UserError

SOURCES = ("stdlib", "files", "tfds")
FILE_FORMATS = ("document", "lines", "paragraphs")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: a small code model on the Python standard library, offline."""
    return ml_collections.ConfigDict(
        dict(
            source="stdlib",  # "stdlib" | "files" | "tfds"
            train_files="",  # comma-separated globs, for source="files"
            eval_files="",
            file_format="document",  # "document" | "lines" | "paragraphs"
            tfds_name="",
            tfds_data_dir="",
            tfds_train_split="train",
            tfds_eval_split="validation",
            tfds_text_key="text",
            tokenizer="",  # sentencepiece .model; "" = data/assets/stdlib_bpe8k.model
            seq_len=256,
            pack_documents=True,  # segment ids + per-document positions
            shuffle_buffer=1024,  # in packed windows
            eval_max_batches=0,  # 0 = the whole eval split
        )
    )


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the choices that would otherwise fail deep inside tf.data."""
    if cfg.source not in SOURCES:
        raise UserError(f"data.source: {cfg.source!r} is not one of {SOURCES}.")
    if cfg.file_format not in FILE_FORMATS:
        raise UserError(f"data.file_format: {cfg.file_format!r} is not one of {FILE_FORMATS}.")
    if cfg.seq_len < 1:
        raise UserError(f"data.seq_len: must be >= 1, got {cfg.seq_len}.")
    if cfg.shuffle_buffer < 1:
        raise UserError(f"data.shuffle_buffer: must be >= 1, got {cfg.shuffle_buffer}.")
    if cfg.eval_max_batches < 0:
        raise UserError(f"data.eval_max_batches: must be >= 0, got {cfg.eval_max_batches}.")
    if cfg.source == "tfds" and not cfg.tfds_name:
        raise UserError(
            "data.tfds_name: empty with data.source='tfds'. Name a TFDS dataset, e.g. 'lm1b'."
        )
