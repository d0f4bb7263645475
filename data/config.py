"""The data section of a config: its fields, defaults, allowed values and meaning."""

import dataclasses

import ml_collections

from configs.schema import check_fields, defaults, field, from_values

SOURCES = ("stdlib", "files", "tfds")
FILE_FORMATS = ("document", "lines", "paragraphs")
PIPELINES = ("cache", "stream")
SAMPLINGS = ("permutation", "random_offsets")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`; constructing it checks every value (see configs/schema.py)."""

    source: str = field(
        "stdlib", SOURCES, "stdlib (this Python's standard library), files, or tfds"
    )
    pipeline: str = field(
        "cache",
        PIPELINES,
        "cache: tokenized once into data.cache_dir, windows read by index in a global shuffle; "
        "stream: tokenized on the fly with a local shuffle buffer (corpora too large to cache)",
    )
    cache_dir: str = field(
        "",
        str,
        "the token cache (pipeline=cache), prepared on first use or by `python -m data.prepare`; "
        "'' = ~/.cache/meshlm/tokens/<source>-<hash of source and tokenizer>",
    )
    sampling: str = field(
        "permutation",
        SAMPLINGS,
        "pipeline=cache: each epoch a seeded permutation of all windows, or windows at "
        "uniformly random token offsets",
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
    shuffle_buffer: int = field(
        1024, "[1, inf)", "pipeline=stream: a local shuffle buffer of packed windows, not global"
    )
    eval_max_batches: int = field(0, "[0, inf)", "evaluation batches; 0 = the whole eval split")

    def __post_init__(self):
        check_fields(self, "data")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: a small code model on the Python standard library, offline, from a token cache."""
    return ml_collections.ConfigDict(defaults(DataConfig))


def validate(cfg) -> DataConfig:
    """Checks `config.data` (every field, before tf.data sees any of it)."""
    return from_values(DataConfig, cfg, "data")
