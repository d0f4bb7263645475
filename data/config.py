"""The data section of a config: its fields, defaults, allowed values and meaning."""

import dataclasses

import ml_collections

from configs.schema import check_fields, defaults, field, from_values

SOURCES = ("stdlib", "files", "tfds")
FILE_FORMATS = ("document", "lines", "paragraphs")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`; constructing it checks every value (see configs/schema.py)."""

    source: str = field(
        "stdlib", SOURCES, "stdlib (this Python's standard library), files, or tfds"
    )
    train_files: str = field(
        "", "globs", "comma-separated globs of training text", needed_if="source=files"
    )
    eval_files: str = field(
        "", "globs", "comma-separated globs of evaluation text", needed_if="source=files"
    )
    file_format: str = field(
        "document", FILE_FORMATS, "one document per file, per line, or per blank-line paragraph"
    )
    tfds_name: str = field("", "text", "TFDS dataset name, e.g. lm1b", needed_if="source=tfds")
    tfds_data_dir: str = field("", "dir", "TFDS data directory; '' = ~/tensorflow_datasets")
    tfds_train_split: str = field(
        "train", "text", "TFDS split to train on", needed_if="source=tfds"
    )
    tfds_eval_split: str = field(
        "validation", "text", "TFDS split to evaluate on", needed_if="source=tfds"
    )
    tfds_text_key: str = field(
        "text", "text", "TFDS feature holding the text", needed_if="source=tfds"
    )
    tokenizer: str = field("", "file", "sentencepiece .model; '' = data/assets/stdlib_bpe8k.model")
    seq_len: int = field(256, "[1, inf)", "tokens per training sequence")
    pack_documents: bool = field(
        True, bool, "segment ids + per-document positions: attention never crosses documents"
    )
    shuffle_buffer: int = field(1024, "[1, inf)", "shuffle buffer, in packed windows")
    eval_max_batches: int = field(0, "[0, inf)", "evaluation batches; 0 = the whole eval split")

    def __post_init__(self):
        check_fields(self, "data")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: a small code model on the Python standard library, offline."""
    return ml_collections.ConfigDict(defaults(DataConfig))


def validate(cfg) -> DataConfig:
    """Checks `config.data` (every field, before tf.data sees any of it)."""
    return from_values(DataConfig, cfg, "data")
