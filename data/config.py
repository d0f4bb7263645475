"""The data section of a config: its fields, defaults, allowed values and meaning."""

import dataclasses

import ml_collections

from config_schema import check_fields, defaults, field, from_values
from errors import UserError

SOURCES = ("stdlib", "files", "tfds", "sft")
FILE_FORMATS = ("document", "lines", "paragraphs")
PIPELINES = ("cache", "stream")
SAMPLINGS = ("permutation", "random_offsets")
SFT_TEMPLATES = ("plain", "hf")
MIXTURE_FIELDS = (  # what one source of data.mixture may set; the rest is the run's
    "source",
    "train_files",
    "eval_files",
    "file_format",
    "tfds_name",
    "tfds_data_dir",
    "tfds_train_split",
    "tfds_eval_split",
    "tfds_text_key",
    "cache_dir",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`; constructing it checks every value (see config_schema.py)."""

    source: str = field(
        "stdlib",
        SOURCES,
        "stdlib (this Python's standard library), files, tfds, or sft (fine-tuning examples "
        "from data.sft_file, docs/FINETUNING.md)",
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
    tokenizer: str = field(
        "",
        "file",
        "sentencepiece .model ('' = data/assets/stdlib_bpe8k.model), or an imported model's "
        "tokenizer.json",
    )
    seq_len: int = field(
        256, "[1, inf)", "tokens per training sequence (an encoder-decoder's: the decoder's)"
    )
    encoder_seq_len: int = field(
        0,
        "[0, inf)",
        "encoder-decoder models (model.encoder_layers > 0): the encoder's tokens per row, "
        "beside data.seq_len the decoder's; 0 = data.seq_len. Span corruption reads the raw "
        "windows whose corrupted inputs fit this and whose targets fit data.seq_len",
    )
    pack_documents: bool = field(
        True, bool, "segment ids + per-document positions: attention never crosses documents"
    )
    shuffle_buffer: int = field(
        1024, "[1, inf)", "pipeline=stream: a local shuffle buffer of packed windows, not global"
    )
    eval_max_batches: int = field(0, "[0, inf)", "evaluation batches; 0 = the whole eval split")
    mixture: str = field(
        "",
        str,
        "weighted sources blended by window, e.g. 'stdlib:0.7,code:0.3' (weights > 0, "
        "normalised; each window is one source's, so row share = token share = weight); "
        "'' = data.source alone. A name is stdlib/files/tfds (the data.* fields) or defined in "
        "data.mixture_sources; pipeline=cache only (docs/DATA.md)",
    )
    mixture_sources: str = field(
        "",
        str,
        "data.mixture's sources by name, ';'-separated, each 'NAME: field=value ...' with "
        f"fields {', '.join(MIXTURE_FIELDS)} (the rest are the run's), e.g. "
        "'code: source=files train_files=code/*.py eval_files=val/*.py'",
    )
    sft_file: str = field(
        "",
        "file",
        'source=sft: JSONL of {"prompt", "response"} or {"messages": [{"role", "content"}]} '
        "examples to train on (only response tokens are learned)",
    )
    sft_eval_file: str = field(
        "", "file", "source=sft: JSONL examples for the validation loss (on response tokens)"
    )
    sft_template: str = field(
        "plain",
        SFT_TEMPLATES,
        "source=sft: how turns become text: plain ('User: ...\\nAssistant: ...<eos>') or hf "
        "(the chat_template beside a tokenizer.json data.tokenizer)",
    )
    skip_bad_lines: bool = field(
        False, bool, "source=sft: skip (and count) bad JSONL lines instead of stopping"
    )

    def __post_init__(self):
        check_fields(self, "data")
        if self.source == "sft":
            for name in ("sft_file", "sft_eval_file"):
                if not getattr(self, name):
                    raise UserError(f"data.{name} is empty: data.source=sft needs a JSONL file.")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: a small code model on the Python standard library, offline, from a token cache."""
    return ml_collections.ConfigDict(defaults(DataConfig))


def validate(cfg) -> DataConfig:
    """Checks `config.data` (every field, before tf.data sees any of it)."""
    return from_values(DataConfig, cfg, "data")


def encoder_length(data, encoder_layers: int) -> int:
    """The encoder's row length of a model with `encoder_layers`: 0 for a decoder-only one
    (its batches have no encoder fields), else data.encoder_seq_len or data.seq_len."""
    return (data.encoder_seq_len or data.seq_len) if encoder_layers else 0


def split_field(cfg, split: str) -> str:
    """The config field that names `split` ('train' or 'eval') of the source, for messages."""
    train = split == "train"
    return {
        "stdlib": "data.source",
        "files": "data.train_files" if train else "data.eval_files",
        "tfds": "data.tfds_train_split" if train else "data.tfds_eval_split",
    }[cfg.source]
