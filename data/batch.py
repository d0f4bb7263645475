"""The batch format, defined once: its fields, their dtypes and shapes.

A batch is a dict of arrays, each [batch, seq_len]:

    inputs       int32    token ids fed to the model
    targets      int32    the next token of each input (inputs shifted by one)
    segment_ids  int32    document of each token within its row, 1-based; 0 = padding
    positions    int32    position of each token within its document
    weights      float32  loss weight of each target: 0 for padding and document ends;
                          in fine-tuning data (data.source=sft) also 0 on every target that
                          is not a response (assistant) token, so only responses are learned
    prefix_mask  int32    1 on the tokens of each document's bidirectional prefix (prefix-LM
                          objectives, data/objectives.py; model.attention_mask=prefix), else 0

The packer makes batches in this format, the train and eval steps read it, and
the Trainer shards it; tests and benchmarks make random ones with `random_batch`.
Fine-tuning's loss mask is not a field of its own: it is folded into `weights`
(data/sft_batches.py), which the loss already multiplies by, so no second mask
is multiplied in. A new field is one new line in BATCH_FIELDS.
"""

import jax
import numpy as np

BATCH_FIELDS = {
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "weights": np.float32,
    "prefix_mask": np.int32,
}


def batch_spec(batch_size: int, seq_len: int, sharding=None) -> dict:
    """Shapes and dtypes of one batch, as jax.ShapeDtypeStruct (with `sharding`, if given)."""
    return {
        key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding)
        for key, dtype in BATCH_FIELDS.items()
    }


def make_batch(**arrays) -> dict:
    """The batch from its fields, cast to their dtypes; a missing or extra field is a bug.
    `prefix_mask` may be left out: next-token batches have no prefix (all 0)."""
    arrays.setdefault("prefix_mask", np.zeros(np.shape(arrays["inputs"]), np.int32))
    if set(arrays) != set(BATCH_FIELDS):
        raise KeyError(f"batch fields {sorted(arrays)} != {sorted(BATCH_FIELDS)}")
    return {key: np.asarray(arrays[key], dtype) for key, dtype in BATCH_FIELDS.items()}


def random_batch(
    batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, packed: bool = True
) -> dict:
    """Random tokens in the batch format; with `packed`, each row holds two documents."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (batch_size, seq_len + 1))
    segment_ids = np.ones((batch_size, seq_len))
    positions = np.tile(np.arange(seq_len), (batch_size, 1))
    weights = np.ones((batch_size, seq_len))
    if packed:
        split = seq_len // 2 + 1
        segment_ids[:, split:] = 2
        positions[:, split:] -= split
        weights[:, split - 1] = 0.0  # the last token of document 1 does not predict document 2
        weights[-1, -3:] = 0.0  # and some padding-like zero weights
    return make_batch(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=segment_ids,
        positions=positions,
        weights=weights,
    )
