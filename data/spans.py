"""T5's span corruption (data/objectives.py's span_corruption): the one span sampler,
`corrupt`, and the rows it makes for a decoder-only model (a prefix LM) and for an
encoder-decoder, with the sizes that keep every row whole. The objective is a
data/objectives.Objective; its draws are hashes of (seed, batch index, global row).
"""

import numpy as np

from data import packing
from data.batch import make_batch
from data.shuffle import hash_ints
from errors import UserError

_SPANS = 4  # the hash domain of the span draws, after data/objectives.py's four


def max_spans(objective, length: int) -> int:
    """Noise spans of a document of `length` tokens: floor(length * density / mean span).
    The floor makes the spans of a row's documents sum to at most those of the whole row,
    so sizing by the row's length is enough."""
    return int(length * objective.noise_density / objective.mean_span_length)


def span_counts(objective, length: int) -> tuple[int, int]:
    """(noise spans, noise tokens) of `length` tokens, as T5: max_spans but at most one span
    per two tokens, and round(length * density) noise tokens, at least one per span and
    leaving one non-noise token per span; (0, 0) when too short for a span."""
    spans = min(max_spans(objective, length), length // 2)
    if spans == 0:
        return 0, 0
    return spans, int(np.clip(round(length * objective.noise_density), spans, length - spans))


def corrupt(objective, tokens: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption of one document: (inputs with sentinels, targets with
    sentinels). Spans alternate non-noise, noise, ... (T5's random_spans_noise_mask), so
    a document ends in noise; its noise spans and non-noise spans have random positive
    lengths. A document too short for one span (max_spans = 0) is all input, no target."""
    length = len(tokens)
    spans, noise = span_counts(objective, length)
    if spans == 0:
        return tokens, tokens[:0]
    noise_lengths = _segment(noise, spans, rng)
    kept_lengths = _segment(length - noise, spans, rng)
    pieces = np.split(tokens, np.cumsum(np.stack([kept_lengths, noise_lengths], 1).ravel())[:-1])
    sentinels = [np.array([s], tokens.dtype) for s in objective.sentinel_ids[:spans]]
    inputs = [p for kept, s in zip(pieces[0::2], sentinels) for p in (kept, s)]
    targets = [p for s, span in zip(sentinels, pieces[1::2]) for p in (s, span)]
    return np.concatenate(inputs), np.concatenate(targets)


def _segment(items: int, segments: int, rng) -> np.ndarray:
    """`items` cut into `segments` random positive lengths (T5's _random_segmentation)."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def corrupt_rows(objective, tokens, doc_ids, index: int, rows: np.ndarray):
    """Windows [B, W] -> (tokens, document ids, prefix) [B, seq_len + 1]: each document
    corrupted (`corrupt`) into its inputs (the prefix) then its targets, in the row's order;
    the rest of a row is padding."""
    width = objective.seq_len + 1
    out_tokens = np.zeros((len(rows), width), np.int32)
    out_docs = np.full((len(rows), width), packing.PAD_DOC, np.int64)
    prefix = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows.tolist()):
        rng = np.random.default_rng(int(hash_ints(objective.seed, _SPANS, index, row)))
        at = 0
        for doc, (start, end) in enumerate(_runs(doc_ids[r])):
            inputs, targets = corrupt(objective, tokens[r, start:end], rng)
            stop = at + len(inputs) + len(targets)
            out_tokens[r, at:stop] = np.concatenate([inputs, targets])
            out_docs[r, at:stop] = doc
            prefix[r, at : at + len(inputs)] = True
            at = stop
    return out_tokens, out_docs, prefix


def _runs(doc_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each document (run of one id, not padding) of a row."""
    edges = np.flatnonzero(np.diff(doc_ids)) + 1
    bounds = zip(np.concatenate([[0], edges]).tolist(), np.append(edges, len(doc_ids)).tolist())
    return [(s, e) for s, e in bounds if doc_ids[s] != packing.PAD_DOC]


def encoder_decoder_lengths(objective, length: int) -> tuple[int, int]:
    """(encoder, decoder) tokens of an encoder-decoder's span corruption of `length` tokens:
    the kept tokens and a sentinel per span, then the spans each behind its sentinel; + eos."""
    spans, noise = span_counts(objective, length)
    eos = int(objective.eos_id is not None)
    return length - noise + spans + eos, noise + spans + eos


def encoder_decoder_window(objective) -> int:
    """The longest raw window W such that W and every shorter window (an evaluation's
    padded rows) corrupt into at most encoder_seq_len and seq_len tokens (T5's
    random_spans_helper: 568 raw tokens for 512 and 114); UserError if W has no span."""
    length = 1
    while _fits(objective, length + 1):
        length += 1
    if span_counts(objective, length)[0] == 0:
        raise UserError(
            f"data.encoder_seq_len={objective.encoder_seq_len} / data.seq_len={objective.seq_len}:"
            " rows too short for one noise span of train.span_noise_density="
            f"{objective.noise_density}, train.span_mean_length={objective.mean_span_length}; "
            "give longer rows (T5: 512 / 114)."
        )
    return length


def _fits(objective, length: int) -> bool:
    encoder, decoder = encoder_decoder_lengths(objective, length)
    return encoder <= objective.encoder_seq_len and decoder <= objective.seq_len


def encoder_decoder_rows(objective, tokens, doc_ids, index: int, rows: np.ndarray) -> dict:
    """An encoder-decoder's batch (data/objectives.py's docstring): the real tokens of each row's
    window corrupted as one example (`corrupt`, drawing as corrupt_rows does); an
    all-padding row (an evaluation's last batch) stays padding."""
    eos = [] if objective.eos_id is None else [objective.eos_id]
    sides = {"encoder": objective.encoder_seq_len, "decoder": objective.seq_len}
    out = {side: np.zeros((len(rows), width), np.int32) for side, width in sides.items()}
    lengths = {side: np.zeros((len(rows), 1), np.int32) for side in sides}
    for r, row in enumerate(rows.tolist()):
        text = tokens[r][doc_ids[r] != packing.PAD_DOC]
        if not len(text):
            continue
        rng = np.random.default_rng(int(hash_ints(objective.seed, _SPANS, index, row)))
        for side, part in zip(sides, corrupt(objective, text, rng)):
            part = np.concatenate([part, eos])
            out[side][r, : len(part)], lengths[side][r] = part, len(part)
    real = {side: np.arange(sides[side]) < lengths[side] for side in sides}
    start = np.full((len(rows), 1), objective.start_id, np.int32)
    return make_batch(
        inputs=np.concatenate([start, out["decoder"][:, :-1]], axis=1) * real["decoder"],
        targets=out["decoder"],
        segment_ids=real["decoder"],
        positions=np.where(real["decoder"], np.arange(objective.seq_len), 0),
        weights=real["decoder"],
        encoder_inputs=out["encoder"],
        encoder_segment_ids=real["encoder"],
        encoder_positions=np.where(real["encoder"], np.arange(objective.encoder_seq_len), 0),
    )
