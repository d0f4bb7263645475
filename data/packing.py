"""Packing: token streams -> fixed windows -> model batches.

Documents (each already ending in eos) are concatenated and cut into windows of
`seq_len + 1` tokens; a document longer than a window continues in the next
one. The cut is a `tf.data` scan over batches of tokenized documents, so the
work is a few vectorised tensor ops per batch of documents, not per token. Each
window carries, beside its tokens, the stream-wide id of the document every
token came from (-1 = padding); the model's segment ids, positions and loss
weights are derived from those ids per batch, in numpy.
"""

import numpy as np
import tensorflow as tf

from data.batch import make_batch

PAD_DOC = -1  # document id of padding tokens


def pack_windows(token_batches: tf.data.Dataset, window: int) -> tf.data.Dataset:
    """RaggedTensor [docs, None] per element -> (tokens [window], doc_ids [window]).

    The last partial window is completed with padding; nothing is dropped.
    """

    def flatten(tokens):
        local_ids = tf.cast(tokens.value_rowids(), tf.int32)
        return tokens.flat_values, local_ids, tf.cast(tokens.nrows(), tf.int32)

    # One padding chunk after the data flushes the last partial window out of the scan.
    flush = tf.data.Dataset.from_tensors(
        (tf.zeros([window - 1], tf.int32), tf.fill([window - 1], PAD_DOC), tf.constant(0, tf.int32))
    )
    chunks = token_batches.map(flatten).concatenate(flush)

    def cut(state, chunk):
        carry_tokens, carry_ids, next_doc = state
        tokens, local_ids, num_docs = chunk
        doc_ids = tf.where(local_ids >= 0, local_ids + next_doc, PAD_DOC)
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
        lambda tokens, doc_ids: doc_ids[0] != PAD_DOC
    )  # an all-padding flush window


def pad_rows(tokens: np.ndarray, doc_ids: np.ndarray, rows: int):
    """Completes a partial batch with all-padding rows (weight 0)."""
    missing = rows - tokens.shape[0]
    if missing == 0:
        return tokens, doc_ids
    pad = ((0, missing), (0, 0))
    return np.pad(tokens, pad), np.pad(doc_ids, pad, constant_values=PAD_DOC)


def batch_features(tokens: np.ndarray, doc_ids: np.ndarray, pack_documents: bool) -> dict:
    """Windows [B, T+1] -> the model batch (data/batch.py), each array [B, T].

    segment_ids: per input token, 1-based within the row, 0 = padding.
    positions: restart at 0 at each document start (pack_documents), else 0..T-1.
    weights: 1.0 for real targets; 0.0 for padding and, with pack_documents, where
      the target starts a different document than the input token's.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_in, doc_target = doc_ids[:, :-1], doc_ids[:, 1:]
    real = doc_in != PAD_DOC
    index = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
    weights = doc_target != PAD_DOC
    if pack_documents:
        starts = np.ones(inputs.shape, bool)
        starts[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
        segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
        positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        weights &= doc_target == doc_in
    else:
        segment_ids, positions = np.ones(inputs.shape, np.int32), index
    return make_batch(
        inputs=inputs,
        targets=targets,
        segment_ids=np.where(real, segment_ids, 0),
        positions=np.where(real, positions, 0),
        weights=weights,
    )
