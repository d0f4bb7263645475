"""The batch format, defined once: its fields, their dtypes and shapes.

A batch is a dict of arrays, each [batch, seq_len] (data.seq_len):

    inputs       int32    token ids fed to the model (an encoder-decoder's decoder)
    targets      int32    the next token of each input (inputs shifted by one)
    segment_ids  int32    document of each token within its row, 1-based; 0 = padding
    positions    int32    position of each token within its document
    weights      float32  loss weight of each target: 0 for padding and document ends;
                          in fine-tuning data (data.source=sft) also 0 on every target that
                          is not a response (assistant) token, so only responses are learned
    prefix_mask  int32    1 on the tokens of each document's bidirectional prefix (prefix-LM
                          objectives, data/objectives.py; model.attention_mask=prefix), else 0

An encoder-decoder's batch (model.encoder_layers > 0) adds the encoder's side, each array
[batch, encoder_seq_len] (data.encoder_seq_len, 0 = data.seq_len):

    encoder_inputs       int32  token ids fed to the encoder
    encoder_segment_ids  int32  as segment_ids: a decoder token attends only to the encoder
                                tokens of its own segment id; 0 = padding
    encoder_positions    int32  position of each encoder token within its document

A decoder-only batch has no encoder fields at all (nothing more is sent to the devices).
The packer makes batches in this format, the train and eval steps read it, and
the Trainer shards it (every field over the batch axis); tests and benchmarks make random
ones with `random_batch`. Fine-tuning's loss mask is not a field of its own: it is folded
into `weights` (data/sft_batches.py), which the loss already multiplies by, so no second
mask is multiplied in. A new field is one new line in BATCH_FIELDS (or ENCODER_FIELDS).
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


ENCODER_FIELDS = {
    "encoder_inputs": np.int32,
    "encoder_segment_ids": np.int32,
    "encoder_positions": np.int32,
}


def fields(encoder: bool = False) -> dict:
    """The fields of a decoder-only batch, or with `encoder` an encoder-decoder's."""
    return {**BATCH_FIELDS, **ENCODER_FIELDS} if encoder else BATCH_FIELDS


def batch_spec(batch_size: int, seq_len: int, sharding=None, encoder_seq_len: int = 0) -> dict:
    """Shapes and dtypes of one batch, as jax.ShapeDtypeStruct (with `sharding`, if given);
    `encoder_seq_len` > 0 adds the encoder fields, [batch_size, encoder_seq_len]."""
    spec = {
        key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding)
        for key, dtype in BATCH_FIELDS.items()
    }
    for key, dtype in ENCODER_FIELDS.items() if encoder_seq_len else ():
        spec[key] = jax.ShapeDtypeStruct((batch_size, encoder_seq_len), dtype, sharding=sharding)
    return spec


def make_batch(**arrays) -> dict:
    """The batch from its fields, cast to their dtypes; a missing or extra field is a bug.
    `prefix_mask` may be left out: next-token batches have no prefix (all 0). The encoder
    fields come all together (an encoder-decoder's batch) or not at all."""
    arrays.setdefault("prefix_mask", np.zeros(np.shape(arrays["inputs"]), np.int32))
    expected = fields(encoder="encoder_inputs" in arrays)
    if set(arrays) != set(expected):
        raise KeyError(f"batch fields {sorted(arrays)} != {sorted(expected)}")
    return {key: np.asarray(arrays[key], dtype) for key, dtype in expected.items()}


def random_batch(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int = 0,
    packed: bool = True,
    encoder_seq_len: int = 0,
) -> dict:
    """Random tokens in the batch format; with `packed`, each row holds two documents.
    `encoder_seq_len` > 0 adds random encoder fields, their documents numbered as the
    decoder's (packed: two per row, the second from the middle)."""
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
    encoder = {}
    if encoder_seq_len:
        split = encoder_seq_len // 2 if packed else encoder_seq_len
        index = np.tile(np.arange(encoder_seq_len), (batch_size, 1))
        encoder = dict(
            encoder_inputs=rng.integers(1, vocab_size, (batch_size, encoder_seq_len)),
            encoder_segment_ids=1 + (index >= split),
            encoder_positions=np.where(index >= split, index - split, index),
        )
    return make_batch(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=segment_ids,
        positions=positions,
        weights=weights,
        **encoder,
    )
