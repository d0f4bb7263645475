"""Sentencepiece tokenizer: train one from a text source, load it, tokenize in tf.data.

Every model trained here records the fixed ids pad=0, bos=1, eos=2, unk=3, and
(for bpe/unigram) byte fallback, so no text is ever out of vocabulary. With
--extra_ids=N it also reserves `<mask>` at id 4 and N sentinels `<extra_id_0>`..
`<extra_id_{N-1}>` at ids 5..N+4 (T5's names) for the mlm and span_corruption
objectives (data/objectives.py): control pieces, like pad/bos/eos, which text never
encodes to (a literal "<mask>" in the text stays text). The default, 0, leaves the
vocabulary as it always was. The
normalizer is the identity and whitespace is kept as is, so code (indentation,
newlines) round-trips exactly.

Train a tokenizer:
  python -m data.tokenizer --input=stdlib --vocab_size=8000 --model_type=bpe \
      --output=data/assets/stdlib_bpe8k.model
  python -m data.tokenizer --input=stdlib --extra_ids=100 --output=/tmp/stdlib_bpe8k_x.model
  python -m data.tokenizer --input='corpus/*.txt' --file_format=lines ...
  python -m data.tokenizer --input=tfds:lm1b --tfds_split=train --tfds_text_key=text ...
"""

import argparse
import hashlib
import itertools
import os
from typing import Iterable, Iterator

import sentencepiece as spm
from etils import epath

from data.tokenizer_inputs import source_texts
from errors import UserError
from startup import import_tensorflow

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MASK_PIECE = "<mask>"
SENTINEL_PIECE = "<extra_id_{}>"  # T5's sentinel names, which its tokenizers have too
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_TOKENIZER = os.path.join(ASSETS_DIR, "stdlib_bpe8k.model")
# Special ids and the newline piece, plus 256 byte-fallback pieces for bpe and unigram.
MIN_VOCAB_SIZE = {"char": 6, "bpe": 262, "unigram": 262}
MAX_INT = 2**31 - 1  # sentencepiece's options are int32


class Tokenizer:
    """A sentencepiece model: Python encode/decode and batched in-graph tokenization."""

    def __init__(self, path: str = ""):
        self.path = path or DEFAULT_TOKENIZER
        if not epath.Path(self.path).is_file():  # a local path, or e.g. gs:// in a workdir
            raise UserError(
                f"data.tokenizer: no file {self.path!r}. Give a sentencepiece .model path, "
                "or '' for the bundled one; train one with `python -m data.tokenizer`."
            )
        self.model_proto = epath.Path(self.path).read_bytes()
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()  # names it in token caches
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
        special = [
            i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        ]
        control = {self._sp.id_to_piece(i): i for i in special}
        self.mask_id = control.get(MASK_PIECE)  # --extra_ids: the objectives' reserved ids
        self.sentinel_ids = sentinel_ids(control.get)
        # The ids below it are special (pad, bos, eos, unk, mask, sentinels): never text.
        self.first_text_id = next(i for i in range(self.vocab_size + 1) if i not in special)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        """None when the model has no bos piece (sentencepiece says -1)."""
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_documents(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """Each text's ids followed by eos, tokenized on `num_threads` threads."""
        return self._sp.encode(texts, add_eos=True, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tf_tokenize(self, texts):
        """tf.string [N] -> RaggedTensor int32 [N, None], each document followed by eos."""
        if self._tf_tokenizer is None:
            tf = import_tensorflow()  # before tensorflow_text: no accelerator visible to TF
            import tensorflow_text as tf_text

            with tf.init_scope():  # eagerly, so every later tf.data graph can share it
                self._tf_tokenizer = tf_text.SentencepieceTokenizer(
                    model=self.model_proto, out_type=tf.int32, add_eos=True
                )
        return self._tf_tokenizer.tokenize(texts)


def sentinel_ids(piece_id) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... up to the first missing one, by `piece_id`
    (a piece's id, or None)."""
    ids = []
    while (i := piece_id(SENTINEL_PIECE.format(len(ids)))) is not None:
        ids.append(i)
    return ids


def extra_pieces(extra_ids: int) -> list[str]:
    """--extra_ids=N's reserved pieces: <mask> and N sentinels (none for 0)."""
    return [MASK_PIECE] + [SENTINEL_PIECE.format(k) for k in range(extra_ids)] if extra_ids else []


def train_tokenizer(
    texts: Iterable[str],
    output: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    extra_ids: int = 0,
) -> Tokenizer:
    """Trains a sentencepiece model on the lines of `texts` and writes `output`.

    `output` may name the file with or without `.model` (sentencepiece appends it);
    its directory is created if needed, and removed again if training fails.
    `extra_ids` > 0 reserves <mask> and that many sentinels after the fixed ids.
    The returned Tokenizer's path is the file written.
    """
    check_training_flags(vocab_size, model_type, max_sentences, extra_ids)
    path = output_path(output)
    prefix = path[: -len(".model")]
    lines = _lines(texts)
    first = next(lines, None)
    if first is None:
        raise UserError(
            "--input: no text in the input (every document is empty); give files that hold text."
        )
    created = []
    try:
        _make_parents(path, created)
        _train(
            itertools.chain([first], lines),
            prefix,
            vocab_size,
            model_type,
            max_sentences,
            extra_pieces(extra_ids),
        )
    except OSError as error:
        _remove_dirs(created)
        raise UserError(f"--output={output!r}: cannot write there ({error}).") from None
    except RuntimeError as error:  # sentencepiece's own checks, e.g. a vocabulary too large
        _remove_dirs(created)
        reason = str(error).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # drop its source line
        raise UserError(
            f"--vocab_size={vocab_size}: sentencepiece cannot train a {model_type} model "
            f"of this size on this input: {reason}"
        ) from None
    os.remove(prefix + ".vocab")
    return Tokenizer(path)


def check_training_flags(
    vocab_size: int, model_type: str, max_sentences: int, extra_ids: int = 0
) -> None:
    """Raises UserError for a vocabulary size, model type, sentence count or number of
    reserved ids that cannot train."""
    if model_type not in ("bpe", "unigram", "char"):
        raise UserError(f"--model_type: {model_type!r} is not one of bpe, unigram, char.")
    if not 0 <= extra_ids <= MAX_INT:
        raise UserError(f"--extra_ids={extra_ids}: must be >= 0 (0 = no <mask> or sentinels).")
    extra = len(extra_pieces(extra_ids))
    minimum = MIN_VOCAB_SIZE[model_type] + extra
    if vocab_size < minimum:
        raise UserError(
            f"--vocab_size={vocab_size}: a {model_type} model needs at least {minimum} pieces "
            "(4 special ids and a newline"
            + (f", {extra} reserved by --extra_ids" if extra else "")
            + (", plus 256 byte pieces)." if model_type != "char" else ").")
        )
    if vocab_size > MAX_INT:
        raise UserError(f"--vocab_size={vocab_size}: must be at most {MAX_INT}.")
    if not 1 <= max_sentences <= MAX_INT:
        raise UserError(f"--max_sentences={max_sentences}: must be in [1, {MAX_INT}].")


def output_path(output: str) -> str:
    """The .model file `output` names; UserError if it cannot be written. Creates nothing."""
    path = output if output.endswith(".model") else output + ".model"
    if os.path.basename(path) == ".model":
        raise UserError(f"--output={output!r}: give a file name, e.g. --output=dir/tok.model.")
    if os.path.isdir(path):
        raise UserError(f"--output={output!r}: {path!r} is a directory; give a file in it.")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # created later, by train_tokenizer
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--output={output!r}: {parent!r} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output={output!r}: cannot write in {parent!r}; choose another path.")
    return path


def _make_parents(path: str, created: list[str]) -> None:
    """Creates the missing directories above `path`, appending each to `created`."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory)
        created.append(directory)


def _remove_dirs(created: list[str]) -> None:
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:  # not empty: something else wrote there meanwhile
            break


def _train(sentences, prefix, vocab_size, model_type, max_sentences, control_symbols):
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
        control_symbols=control_symbols,  # ids right after unk; never produced by encode
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


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad or missing flag as one line `error: ...`, like every other mistake."""

    def error(self, message):
        raise SystemExit(f"error: {message} (see --help).")


def main(argv=None) -> None:
    parser = _ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", default="stdlib", help="'stdlib', comma-separated file globs, or 'tfds:NAME'"
    )
    parser.add_argument(
        "--file_format", default="document", choices=["document", "lines", "paragraphs"]
    )
    parser.add_argument("--tfds_split", default="train")
    parser.add_argument("--tfds_text_key", default="text")
    parser.add_argument(
        "--tfds_data_dir", default="", help="where the prepared TFDS dataset is (never downloaded)"
    )
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char"])
    parser.add_argument(
        "--extra_ids",
        type=int,
        default=0,
        help="reserve <mask> and this many sentinels <extra_id_k> (mlm, span_corruption); 0 = none",
    )
    parser.add_argument(
        "--max_sentences", type=int, default=2_000_000, help="lines sampled for training"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="the .model file to write ('.model' may be left out); its directory is created",
    )
    args = parser.parse_args(argv)
    try:
        # Cheap checks first: the flags, then the input (globs, TFDS dataset), then the slow work.
        check_training_flags(args.vocab_size, args.model_type, args.max_sentences, args.extra_ids)
        output_path(args.output)
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
            extra_ids=args.extra_ids,
        )
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {tok.path}: {tok.vocab_size} pieces, {os.path.getsize(tok.path)} bytes")


if __name__ == "__main__":
    main()
