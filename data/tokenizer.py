"""Sentencepiece tokenizer: train one from a text source, load it, tokenize in tf.data.

Every model trained here records the fixed ids pad=0, bos=1, eos=2, unk=3, and
(for bpe/unigram) byte fallback, so no text is ever out of vocabulary. The
normalizer is the identity and whitespace is kept as is, so code (indentation,
newlines) round-trips exactly.

Train a tokenizer:
  python -m data.tokenizer --input=stdlib --vocab_size=8000 --model_type=bpe \
      --output=data/assets/stdlib_bpe8k.model
  python -m data.tokenizer --input='corpus/*.txt' --file_format=lines ...
  python -m data.tokenizer --input=tfds:lm1b --tfds_split=train --tfds_text_key=text ...
"""

import argparse
import itertools
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from data.config import default_data_config
from errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_TOKENIZER = os.path.join(ASSETS_DIR, "stdlib_bpe8k.model")
# Special ids and the newline piece, plus 256 byte-fallback pieces for bpe and unigram.
MIN_VOCAB_SIZE = {"char": 6, "bpe": 262, "unigram": 262}


class Tokenizer:
    """A sentencepiece model: Python encode/decode and batched in-graph tokenization."""

    def __init__(self, path: str = ""):
        self.path = path or DEFAULT_TOKENIZER
        if not os.path.isfile(self.path):
            raise UserError(
                f"data.tokenizer: no file {self.path!r}. Give a sentencepiece .model path, "
                "or '' for the bundled one; train one with `python -m data.tokenizer`."
            )
        with open(self.path, "rb") as f:
            self.model_proto = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except Exception as e:
            raise UserError(
                f"data.tokenizer: {self.path!r} is not a sentencepiece model ({e})."
            ) from e
        if self._sp.eos_id() < 0:
            raise UserError(
                f"data.tokenizer: {self.path!r} has no eos token; train one with `python -m data.tokenizer`."
            )
        self._tf_tokenizer = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tf_tokenize(self, texts):
        """tf.string [N] -> RaggedTensor int32 [N, None], each document followed by eos."""
        if self._tf_tokenizer is None:
            import tensorflow as tf
            import tensorflow_text as tf_text

            with tf.init_scope():  # eagerly, so every later tf.data graph can share it
                self._tf_tokenizer = tf_text.SentencepieceTokenizer(
                    model=self.model_proto, out_type=tf.int32, add_eos=True
                )
        return self._tf_tokenizer.tokenize(texts)


def train_tokenizer(
    texts: Iterable[str],
    output: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Trains a sentencepiece model on the lines of `texts` and writes `output`.

    `output` may name the file with or without `.model` (sentencepiece appends it);
    its directory is created if needed. The returned Tokenizer's path is the file written.
    """
    if model_type not in ("bpe", "unigram", "char"):
        raise UserError(f"--model_type: {model_type!r} is not one of bpe, unigram, char.")
    minimum = MIN_VOCAB_SIZE[model_type]
    if vocab_size < minimum:
        raise UserError(
            f"--vocab_size={vocab_size}: a {model_type} model needs at least {minimum} pieces "
            "(4 special ids and a newline" + (", plus 256 byte pieces)." if minimum > 6 else ").")
        )
    if max_sentences < 1:
        raise UserError(f"--max_sentences={max_sentences}: must be at least 1.")
    path = output if output.endswith(".model") else output + ".model"
    prefix = path[: -len(".model")]
    lines = _lines(texts)
    first = next(lines, None)
    if first is None:
        raise UserError("--input: no text in the input (every document is empty).")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _train(itertools.chain([first], lines), prefix, vocab_size, model_type, max_sentences)
    except OSError as error:
        raise UserError(f"--output={output!r}: cannot write there ({error}).") from None
    except RuntimeError as error:  # sentencepiece's own checks, e.g. a vocabulary too large
        reason = str(error).strip().splitlines()[-1]
        raise UserError(
            f"sentencepiece cannot train this model: {reason} (check --vocab_size)."
        ) from None
    os.remove(prefix + ".vocab")
    return Tokenizer(path)


def _train(sentences, prefix: str, vocab_size: int, model_type: str, max_sentences: int):
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=model_type != "char",
        hard_vocab_limit=model_type != "char",
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=["\n"],  # lines are the training sentences; newlines still get one id
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        character_coverage=0.9995 if model_type != "char" else 1.0,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def source_texts(
    source: str,
    *,
    file_format: str = "document",
    tfds_split: str = "train",
    tfds_text_key: str = "text",
    tfds_data_dir: str = "",
) -> Iterator[str]:
    """Training documents of 'stdlib', comma-separated globs, or 'tfds:NAME', via data.sources."""
    from data import sources  # imports TensorFlow; only the command needs it

    cfg = default_data_config()
    if source == "stdlib":
        cfg.source = "stdlib"
    elif source.startswith("tfds:"):
        cfg.update(
            source="tfds",
            tfds_name=source[len("tfds:") :],
            tfds_train_split=tfds_split,
            tfds_text_key=tfds_text_key,
            tfds_data_dir=tfds_data_dir,
        )
    else:
        sources.expand_globs(source, "--input")  # names the flag when a glob matches nothing
        cfg.update(source="files", train_files=source, file_format=file_format)
    for _, text in sources.documents(cfg, "train").as_numpy_iterator():
        yield text.decode("utf-8", errors="replace")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--input", default="stdlib", help="'stdlib', comma-separated file globs, or 'tfds:NAME'"
    )
    parser.add_argument(
        "--file_format", default="document", choices=["document", "lines", "paragraphs"]
    )
    parser.add_argument("--tfds_split", default="train")
    parser.add_argument("--tfds_text_key", default="text")
    parser.add_argument("--tfds_data_dir", default="")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char"])
    parser.add_argument(
        "--max_sentences", type=int, default=2_000_000, help="lines sampled for training"
    )
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    args = parser.parse_args(argv)
    try:
        texts = source_texts(
            args.input,
            file_format=args.file_format,
            tfds_split=args.tfds_split,
            tfds_text_key=args.tfds_text_key,
            tfds_data_dir=args.tfds_data_dir,
        )
        tok = train_tokenizer(
            texts,
            args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
        )
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {tok.path}: {tok.vocab_size} pieces, {os.path.getsize(tok.path)} bytes")


if __name__ == "__main__":
    main()
