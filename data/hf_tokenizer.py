"""Hugging Face tokenizers: a tokenizer.json as a meshlm tokenizer, and a meshlm tokenizer for transformers.

Many Hugging Face models ship a `tokenizer.json` (the `tokenizers` package)
rather than a sentencepiece model. `HFTokenizer` gives it the Python API of
data.tokenizer.Tokenizer (vocab_size, eos_id, encode, decode, and the data
pipeline's encode_documents and tf_tokenize), so sampling, evaluation and training
on text work on imported models with their own tokenizer; `load_tokenizer` picks
the class by file type.

`save_for_transformers` writes a tokenizer into a Hugging Face model directory
that `transformers.AutoTokenizer` loads offline: a tokenizer.json is copied with
its tokenizer_config.json; a sentencepiece BPE model is converted into a
tokenizer.json that gives the same ids for every text (no bos is added, as in
meshlm's training data).
"""

import hashlib
import json
import os

import numpy as np
import tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers

from data.tokenizer import MASK_PIECE, Tokenizer, sentinel_ids
from errors import UserError
from startup import import_tensorflow

CONFIG_FILE = "tokenizer_config.json"  # transformers' special tokens and options
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # and the named ones besides "default"
# sentencepiece piece types (sentencepiece_model.proto) and model types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SP_BPE = 2


class HFTokenizer:
    """A tokenizer.json with the Python API of data.tokenizer.Tokenizer.

    `encode` adds what the file's post-processor adds (e.g. Llama 3's bos), as
    transformers' `tokenizer(text)` does; `decode` leaves special tokens out. The
    special tokens and options come from `config`, by default the
    tokenizer_config.json beside the file, which must name an eos_token.
    """

    def __init__(self, path: str, config: dict | None = None):
        self.path = path
        if not epath.Path(path).is_file():  # a local path, or e.g. gs:// in a workdir
            raise UserError(f"data.tokenizer: no file {path!r}.")
        text = epath.Path(path).read_text()
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # noqa: BLE001 -- tokenizers raises a bare Exception
            raise UserError(
                f"data.tokenizer: {path!r} is not a Hugging Face tokenizer.json ({error})."
            ) from None
        self.config = read_tokenizer_config(path) if config is None else config
        # Names it in token caches: the file and the options that change its ids.
        options = json.dumps(self.config, sort_keys=True, default=str)
        self.sha256 = hashlib.sha256((text + options).encode()).hexdigest()
        self.eos_id = self._special_id("eos_token")
        if self.eos_id is None:
            raise UserError(
                f"data.tokenizer: {path!r} has no eos token; its {CONFIG_FILE} must name an "
                "eos_token that is in its vocabulary."
            )
        self.bos_id = self._special_id("bos_token")
        self.pad_id = self._special_id("pad_token")
        # The objectives' reserved ids (data/objectives.py): its mask_token (e.g. ModernBERT's
        # [MASK]) or a <mask> token, and T5's sentinels <extra_id_0>, <extra_id_1>, ...
        self.mask_id = self._special_id("mask_token")
        if self.mask_id is None:
            self.mask_id = self._tokenizer.token_to_id(MASK_PIECE)
        self.sentinel_ids = sentinel_ids(self._tokenizer.token_to_id)
        special = {i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        self.first_text_id = next(i for i in range(self.vocab_size + 1) if i not in special)
        # transformers' split_special_tokens: special tokens written in the text are plain text.
        self._tokenizer.encode_special_tokens = bool(self.config.get("split_special_tokens"))

    def _special_id(self, name: str) -> int | None:
        token = self.config.get(name)
        if isinstance(token, dict):  # older files: {"content": "</s>", ...}
            token = token.get("content")
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_documents(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Each text's ids (as `encode` gives them) followed by eos; `tokenizers` spreads
        a batch over the cores itself, so `num_threads` is not used."""
        del num_threads
        return [e.ids + [self.eos_id] for e in self._tokenizer.encode_batch(texts)]

    def tf_tokenize(self, texts):
        """tf.string [N] -> RaggedTensor int32 [N, None], each document followed by eos,
        as data.tokenizer.Tokenizer's in-graph op gives them (here through
        tf.numpy_function: the Rust tokenizer runs outside the graph)."""
        tf = import_tensorflow()  # only the data pipeline needs it

        def encode(batch):
            ids = self.encode_documents([t.decode("utf-8") for t in batch])
            lengths = np.array([len(i) for i in ids], np.int64)
            return np.fromiter((t for i in ids for t in i), np.int32, lengths.sum()), lengths

        flat, lengths = tf.numpy_function(encode, [texts], [tf.int32, tf.int64], stateful=False)
        flat.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(flat, lengths)


def read_tokenizer_config(tokenizer_json: str) -> dict:
    """The tokenizer_config.json beside a tokenizer.json ({} if there is none), with the
    chat templates of the files beside it in its "chat_template" field, as transformers
    reads them: chat_template.jinja (the "default" one) and additional_chat_templates/NAME.jinja
    replace the field; several templates become a list of {"name", "template"}."""
    directory = epath.Path(tokenizer_json).parent
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
        files = [f for f in [directory / CHAT_TEMPLATE_FILE] if f.is_file()]
        if (directory / CHAT_TEMPLATE_DIR).is_dir():
            files += sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))
        templates = {f.stem if f.parent != directory else "default": f.read_text() for f in files}
    except (OSError, ValueError) as error:
        raise UserError(f"data.tokenizer: cannot read {str(path)!r} ({error}).") from None
    if list(templates) == ["default"]:
        config["chat_template"] = templates["default"]
    elif templates:
        config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    return config


def chat_template(config: dict) -> str | None:
    """The template transformers applies by default: the "chat_template" field, or the
    one named "default" when it lists several; None if there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template or None


def load_tokenizer(path: str) -> Tokenizer | HFTokenizer:
    """The tokenizer `config.data.tokenizer` names: a Hugging Face tokenizer.json (a file
    ending in .json), else a sentencepiece model ('' = the bundled one)."""
    return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def tokenizer_from_sentencepiece(proto) -> tokenizers.Tokenizer:
    """The `tokenizers` equivalent of a sentencepiece BPE model (a parsed ModelProto) as
    meshlm trains them.

    sentencepiece merges the adjacent pair whose merged piece scores highest;
    ranking the merges by that score makes `tokenizers`' BPE take the same steps.
    Control pieces (pad, bos, eos) are special tokens, user-defined pieces (the
    newline) are added tokens, both matched before BPE as sentencepiece does.
    """
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = {
        "model_type": spec.model_type != SP_BPE,
        "normalization": bool(norm.precompiled_charsmap),
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "escape_whitespaces": not norm.escape_whitespaces,
        "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
    }
    if any(unsupported.values()):
        raise UserError(
            "Only sentencepiece BPE models with identity normalization, no dummy prefix and "
            "whitespace kept (as `python -m data.tokenizer --model_type=bpe` trains) convert to "
            f"a tokenizer.json; this one differs in {[k for k, v in unsupported.items() if v]}."
        )
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = [
        (p.piece[:k], p.piece[k:])
        for p in sorted((p for p in pieces if p.type == NORMAL), key=lambda p: -p.score)
        for k in range(1, len(p.piece))
        if p.piece[:k] in vocab and p.piece[k:] in vocab
    ]
    tokenizer = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            merges,
            unk_token=pieces[spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    added = lambda types, special: [
        AddedToken(p.piece, normalized=False, special=special) for p in pieces if p.type in types
    ]
    tokenizer.add_tokens(added((USER_DEFINED,), special=False))
    tokenizer.add_special_tokens(added((CONTROL, UNKNOWN), special=True))
    return tokenizer


def save_for_transformers(path: str, out_dir: str, model_max_length: int) -> HFTokenizer:
    """Writes tokenizer.json and tokenizer_config.json for AutoTokenizer into `out_dir`.

    `path` is config.data.tokenizer. Returns the written tokenizer (its special
    ids go into the model's config.json).
    """
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, HFTokenizer):
        converted, config = None, tokenizer.config
    else:
        proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto)
        converted = tokenizer_from_sentencepiece(proto)  # any UserError before anything is written
        spec = proto.trainer_spec
        piece = lambda i: proto.pieces[i].piece if i >= 0 else None
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": piece(spec.bos_id),
            "eos_token": piece(spec.eos_id),
            "unk_token": piece(spec.unk_id),
            "pad_token": piece(spec.pad_id),
            **({"mask_token": MASK_PIECE} if tokenizer.mask_id is not None else {}),
            "split_special_tokens": True,  # "</s>" in a text is text, as in sentencepiece
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "tokenizer.json")
    source = epath.Path(tokenizer.path)  # e.g. in a gs:// workdir (tools/import_hf.py)
    if converted is None:
        source.copy(target, overwrite=True)
    else:
        converted.save(target)
        source.copy(os.path.join(out_dir, "tokenizer.model"), overwrite=True)  # for other tools
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return HFTokenizer(target)
