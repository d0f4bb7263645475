"""data.pipeline=stream: tf.data tokenizes on the fly, for corpora too large to cache.

documents (data.sources) -> clean UTF-8 -> tokenize in the graph, many documents
per op (tensorflow-text sentencepiece, eos appended) -> cut into seq_len+1
windows (`pack_windows`) -> shuffle -> batch -> prefetch -> numpy dict per process.

The shuffle is a *local* buffer of `data.shuffle_buffer` windows over a stream
that reads files (or TFDS shards) in a seeded order: windows that are near in
the corpus stay near in training. On a corpus of a few large documents that
correlates the batches and costs model quality (BENCHMARKS.md, "Input
pipeline"); the cache pipeline (data.windows) shuffles globally instead.

Multi-host: each process reads a disjoint shard of the train split and yields
its rows of the global batch (global_batch_size // process_count). Evaluation
instead has every process read the whole eval split and keep its rows of each
global batch, so all processes see the same number of eval steps.

Resumable state: the train stream is deterministic given (seed, epoch), so its
state is two integers, {"epoch", "window"}: the packed windows of the epoch
already read by this process (plus what must match on restore). Restoring
rebuilds that epoch's pipeline and skips `window` windows inside tf.data; the
skipped windows are tokenized again but never leave the graph, so restore time
grows with the position in the epoch (5.3 s at 8 M tokens on 2 cores). Each
epoch boundary likewise rebuilds and refills the pipeline while training waits.
"""

from __future__ import annotations

import os

import numpy as np

from data import packing, sources
from data.config import split_field
from errors import UserError
from startup import LazyTensorFlow

tf = LazyTensorFlow()  # imported at first use: importing this module does not start it

DOCS_PER_OP = 128  # documents tokenized per tensorflow-text call
STATE_VERSION = 2


def _windows(cfg, tokenizer, report, split, *, process_index, process_count, shuffle_seed=None):
    """(tokens [seq_len+1], doc_ids [seq_len+1]) windows of this process's share of `split`."""
    docs = sources.documents(
        cfg,
        split,
        process_index=process_index,
        process_count=process_count,
        shuffle_seed=shuffle_seed,
    )

    def tokenize(origins, texts):
        return tokenizer.tf_tokenize(sources.clean_documents(origins, texts, report))

    tokens = docs.batch(DOCS_PER_OP).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    return pack_windows(tokens.prefetch(2), cfg.seq_len + 1)


def pack_windows(token_batches: tf.data.Dataset, window: int) -> tf.data.Dataset:
    """RaggedTensor [docs, None] per element -> (tokens [window], doc_ids [window]): a
    tf.data scan over batches of documents, a few vectorised ops per batch, not per token.

    The last partial window is completed with padding; nothing is dropped.
    """

    def flatten(tokens):
        local_ids = tf.cast(tokens.value_rowids(), tf.int32)
        return tokens.flat_values, local_ids, tf.cast(tokens.nrows(), tf.int32)

    # One padding chunk after the data flushes the last partial window out of the scan.
    flush = tf.data.Dataset.from_tensors(
        (
            tf.zeros([window - 1], tf.int32),
            tf.fill([window - 1], packing.PAD_DOC),
            tf.constant(0, tf.int32),
        )
    )
    chunks = token_batches.map(flatten).concatenate(flush)

    def cut(state, chunk):
        carry_tokens, carry_ids, next_doc = state
        tokens, local_ids, num_docs = chunk
        doc_ids = tf.where(local_ids >= 0, local_ids + next_doc, packing.PAD_DOC)
        tokens = tf.concat([carry_tokens, tokens], 0)
        doc_ids = tf.concat([carry_ids, doc_ids], 0)
        full = (tf.size(tokens) // window) * window
        windows = (
            tf.reshape(tokens[:full], [-1, window]),
            tf.reshape(doc_ids[:full], [-1, window]),
        )
        return (tokens[full:], doc_ids[full:], next_doc + num_docs), windows

    empty = tf.zeros([0], tf.int32)
    windows = chunks.scan((empty, empty, tf.constant(0, tf.int32)), cut).unbatch()
    return windows.filter(
        lambda tokens, doc_ids: doc_ids[0] != packing.PAD_DOC
    )  # an all-padding flush window


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class TrainIterator:
    """Endless, deterministic train batches for one process; reshuffled every epoch."""

    def __init__(self, cfg, tokenizer, *, batch_size, seed, process_index, process_count):
        self._cfg, self._tokenizer = cfg, tokenizer
        self._batch_size, self._seed = batch_size, seed
        self._process_index, self._process_count = process_index, process_count
        self._report = sources.InvalidUtf8Report()
        self._epoch, self._window, self._it = 0, 0, None
        self._dataset(0)  # builds (does not run) the graph, so bad sources fail here, not at step 1

    @property
    def invalid_utf8_documents(self) -> int:
        return self._report.count

    def _dataset(self, epoch: int) -> tf.data.Dataset:
        windows = _windows(
            self._cfg,
            self._tokenizer,
            self._report,
            "train",
            process_index=self._process_index,
            process_count=self._process_count,
            shuffle_seed=_seed(self._seed, epoch, 0),
        )
        return windows.shuffle(
            self._cfg.shuffle_buffer,
            seed=_seed(self._seed, epoch, 1),
            reshuffle_each_iteration=False,
        )

    def _open(self) -> None:
        windows = self._dataset(self._epoch).skip(self._window)
        self._it = windows.batch(self._batch_size).prefetch(2).as_numpy_iterator()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._open()
        try:
            tokens, doc_ids = next(self._it)
        except StopIteration:
            if self._window == 0:
                raise UserError(
                    f"{split_field(self._cfg, 'train')}: process {self._process_index} of "
                    f"{self._process_count} got no tokens (empty corpus or all documents empty). "
                    "Add text or use fewer processes."
                ) from None
            self._epoch, self._window = self._epoch + 1, 0
            self._open()
            return next(self)
        self._window += tokens.shape[0]
        self._report.warn_once()
        tokens, doc_ids = packing.pad_rows(tokens, doc_ids, self._batch_size)
        return packing.batch_features(tokens, doc_ids, self._cfg.pack_documents)

    def _identity(self) -> dict:
        c = self._cfg
        return {
            "seed": self._seed,
            "process_index": self._process_index,
            "process_count": self._process_count,
            "seq_len": c.seq_len,
            "shuffle_buffer": c.shuffle_buffer,
            "source": c.source,
            "tokenizer": os.path.basename(self._tokenizer.path),
        }

    def get_state(self) -> dict:
        """JSON-serialisable position: next() after set_state(state) gives the same batch."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "window": self._window,
            **self._identity(),
        }

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, **self._identity()}
        mismatch = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatch:
            raise UserError(
                f"data iterator state does not match this pipeline (saved, current): {mismatch}. "
                "Resume with the same seed, process count and data config."
            )
        self._epoch, self._window, self._it = int(state["epoch"]), int(state["window"]), None


class EvalStream:
    """Finite eval batches; every iter() yields the same sequence."""

    def __init__(self, cfg, tokenizer, *, global_batch_size, process_index, process_count):
        self._cfg = cfg
        self._rows = slice(
            process_index * (global_batch_size // process_count),
            (process_index + 1) * (global_batch_size // process_count),
        )
        self._global_batch_size = global_batch_size
        self._report = sources.InvalidUtf8Report()
        windows = _windows(cfg, tokenizer, self._report, "eval", process_index=0, process_count=1)
        batches = windows.batch(global_batch_size)
        if cfg.eval_max_batches:
            batches = batches.take(cfg.eval_max_batches)
        self._dataset = batches.prefetch(2)

    @property
    def invalid_utf8_documents(self) -> int:
        return self._report.count

    def __iter__(self):
        empty = True
        for tokens, doc_ids in self._dataset.as_numpy_iterator():
            empty = False
            self._report.warn_once()
            tokens, doc_ids = packing.pad_rows(tokens, doc_ids, self._global_batch_size)
            yield packing.batch_features(
                tokens[self._rows], doc_ids[self._rows], self._cfg.pack_documents
            )
        if empty:
            field = split_field(self._cfg, "eval")
            raise UserError(f"{field}: the eval split has no tokens (empty corpus). Add text.")
