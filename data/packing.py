"""Windows -> model batches, in numpy (no TensorFlow: the cache pipeline reads with it).

A window is `seq_len + 1` tokens of documents back to back (each ending in eos;
a document longer than a window continues in the next one), cut by the token
cache's reader (data.token_cache), the stream's tf.data scan (data.stream), or
the SFT packer (data.sft_batches). Each window carries, beside its tokens, the id
of the document every token came from (PAD_DOC = padding); the model's segment
ids, positions and loss weights are derived from those ids per batch, here.
"""

import numpy as np

from data.batch import make_batch

PAD_DOC = -1  # document id of padding tokens


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
