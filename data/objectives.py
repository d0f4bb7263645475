"""Training objectives beyond next-token prediction, as transforms of packed batches.

train.objective picks one; each is a pure function of (batch, seed, batch index, first
row) -> a batch in the same format (data/batch.py), so it runs on every pipeline (token
cache, stream, mixture), gives the same global batch on any number of processes, and
resumes exactly: its random draws are hashes of (seed, batch index, global row,
position), never a stateful generator.

  clm              next-token prediction over every token (the batch as it is).
  mlm              BERT: each real token is chosen with probability train.mlm_mask_rate;
                   a chosen input becomes <mask> (train.mlm_mask_token of them), a random
                   text token (train.mlm_random_token) or stays; targets are the original
                   tokens at the same positions (not shifted), weights 1 only on chosen
                   ones, so the loss is the mean over masked tokens. Needs
                   model.attention_mask=bidirectional.
  prefix_lm        each document's first P tokens are a bidirectional prefix
                   (prefix_mask 1); the loss is on the tokens after it (targets shifted as
                   clm). P is a uniform random length in [1, L-1] or round(fraction * L)
                   (train.prefix_length, train.prefix_fraction). Needs attention_mask=prefix.
  span_corruption  T5's denoising for a decoder-only model, as prefix-LM: per document,
                   noise spans (train.span_noise_density, train.span_mean_length) are
                   replaced by sentinels <extra_id_k> in the inputs, and the document
                   becomes "inputs with sentinels" (the prefix) followed by "<extra_id_0>
                   span 0 <extra_id_1> span 1 ..." (the loss). Each document grows by two
                   tokens per span, so the pipeline reads shorter windows (raw_seq_len, as
                   T5's random_spans_helper sizes its inputs): nothing is ever cut, and the
                   rest of a row is padding. Needs attention_mask=prefix.

Mask and sentinel ids are tokenizer pieces: `<mask>` and `<extra_id_0>`, ... (T5's names),
reserved by `python -m data.tokenizer --extra_ids=N`, or an imported tokenizer.json's own
mask_token and <extra_id_k> tokens.
"""

import dataclasses
import numpy as np

from data import packing
from data.shuffle import hash_ints
from errors import UserError

OBJECTIVES = ("clm", "mlm", "prefix_lm", "span_corruption")
EVAL_SEED = 0  # evaluation batches are the same at every evaluation of every run
_SELECT, _KIND, _RANDOM, _PREFIX, _SPANS = range(5)  # hash domains
_UNIT = 2.0**-64


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a transform needs: config.train's objective fields, the run's data.seq_len and
    the tokenizer's reserved ids."""

    name: str
    seed: int
    seq_len: int
    mask_rate: float = 0.15
    mask_token: float = 0.8
    random_token: float = 0.1
    prefix_length: str = "uniform"
    prefix_fraction: float = 0.5
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    mask_id: int | None = None
    sentinel_ids: tuple = ()
    text_ids: tuple = (0, 1)  # [low, high): the ids a random replacement draws from


def from_config(train, seq_len: int, tokenizer, seed: int) -> Objective:
    """The Objective of `train` (config.train) with `tokenizer`'s reserved ids; UserError when
    the tokenizer lacks the ids the objective needs."""
    objective = Objective(
        name=train.objective,
        seed=seed,
        seq_len=seq_len,
        mask_rate=train.mlm_mask_rate,
        mask_token=train.mlm_mask_token,
        random_token=train.mlm_random_token,
        prefix_length=train.prefix_length,
        prefix_fraction=train.prefix_fraction,
        noise_density=train.span_noise_density,
        mean_span_length=train.span_mean_length,
        mask_id=tokenizer.mask_id,
        sentinel_ids=tuple(tokenizer.sentinel_ids),
        text_ids=(tokenizer.first_text_id, tokenizer.vocab_size),
    )
    check_vocabulary(objective, tokenizer.path)
    return objective


def check_vocabulary(objective: Objective, tokenizer_path: str) -> None:
    """UserError unless the vocabulary has the mask or sentinel ids the objective uses."""
    if objective.name == "mlm":
        needed, have = 1, int(objective.mask_id is not None)
        what = "a <mask> id (a mask_token)"
    elif objective.name == "span_corruption":
        needed = max_spans(objective, raw_seq_len(objective) + 1)
        have = len(objective.sentinel_ids)
        what = f"{needed} sentinel ids <extra_id_0>... (for data.seq_len={objective.seq_len})"
    else:
        return
    if have < needed:
        raise UserError(
            f"train.objective={objective.name} needs {what} in the vocabulary; data.tokenizer "
            f"{tokenizer_path!r} has {have}: retrain the tokenizer with `python -m "
            "data.tokenizer --extra_ids=100` (or give a tokenizer.json that has them)."
        )


def raw_seq_len(objective: Objective) -> int:
    """The seq_len of the windows the pipeline reads: data.seq_len, or for span_corruption
    the longest raw window W (W - 1 returned) whose corrupted rows always fit seq_len + 1
    tokens, W + 2 * max_spans(W) <= seq_len + 1 (T5's random_spans_helper, for one row)."""
    width = objective.seq_len + 1
    if objective.name != "span_corruption":
        return objective.seq_len
    length = width
    while length > 2 and length + 2 * max_spans(objective, length) > width:
        length -= 1
    return length - 1


def max_spans(objective: Objective, length: int) -> int:
    """Noise spans of a document of `length` tokens: floor(length * density / mean span).
    The floor makes the spans of a row's documents sum to at most those of the whole row,
    so sizing by the row's length is enough."""
    return int(length * objective.noise_density / objective.mean_span_length)


def apply(objective: Objective, batch: dict, index: int, first_row: int) -> dict:
    """`batch` (rows first_row, first_row + 1, ... of global batch `index`) under `objective`."""
    if objective.name == "clm":
        return batch
    rows = first_row + np.arange(batch["inputs"].shape[0])
    transform = {"mlm": mlm, "prefix_lm": prefix_lm, "span_corruption": span_corruption}
    return transform[objective.name](objective, batch, index, rows)


def _uniform(objective, domain, index, rows, columns) -> np.ndarray:
    """Uniform [0, 1) floats, one per (row, column), a hash of the seed and the indices."""
    key = hash_ints(objective.seed, domain, index, rows[:, None], columns[None, :])
    return key.astype(np.float64) * _UNIT


def mlm(objective: Objective, batch: dict, index: int, rows: np.ndarray) -> dict:
    inputs = batch["inputs"]
    columns = np.arange(inputs.shape[1])
    draw = _uniform(objective, _SELECT, index, rows, columns)
    chosen = (draw < objective.mask_rate) & (batch["segment_ids"] > 0)  # never padding
    kind = _uniform(objective, _KIND, index, rows, columns)  # mask | random | kept
    low, high = objective.text_ids
    draw = hash_ints(objective.seed, _RANDOM, index, rows[:, None], columns) % np.uint64(high - low)
    random_ids = low + draw.astype(np.int32)
    to_mask = kind < objective.mask_token
    to_random = ~to_mask & (kind < objective.mask_token + objective.random_token)
    masked = np.where(to_mask, objective.mask_id, np.where(to_random, random_ids, inputs))
    return dict(
        batch,
        inputs=np.where(chosen, masked, inputs),
        targets=inputs,
        weights=chosen.astype(np.float32),
    )


def _documents(segment_ids: np.ndarray):
    """(index within its document, its document's length) of every position; a row's
    documents are its runs of one segment id (padding: segment 0)."""
    batch, length = segment_ids.shape
    index = np.broadcast_to(np.arange(length), segment_ids.shape)
    starts = np.ones(segment_ids.shape, bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    within = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    key = np.cumsum(starts).reshape(batch, length) - 1  # a document number over the batch
    return within, np.bincount(key.reshape(-1))[key]


def prefix_lm(objective: Objective, batch: dict, index: int, rows: np.ndarray) -> dict:
    segments = batch["segment_ids"]
    within, lengths = _documents(segments)
    longest = np.maximum(lengths - 1, 1)  # a prefix leaves at least one token to predict
    if objective.prefix_length == "uniform":
        fraction = _uniform(objective, _PREFIX, index, rows, np.arange(segments.shape[1] + 1))
        fraction = np.take_along_axis(fraction, segments, axis=1)  # one draw per document
        prefix = 1 + np.floor(fraction * longest).astype(np.int64)
    else:
        prefix = np.clip(np.round(objective.prefix_fraction * lengths), 1, longest)
    in_prefix = (within < prefix) & (segments > 0)
    # The last prefix token predicts the first one after it: it sees only the prefix.
    return dict(
        batch,
        prefix_mask=in_prefix.astype(np.int32),
        weights=batch["weights"] * (within >= prefix - 1),
    )


def span_corruption(objective: Objective, batch: dict, index: int, rows: np.ndarray) -> dict:
    tokens, doc_ids = _windows(batch)
    tokens, doc_ids, prefix = corrupt_rows(objective, tokens, doc_ids, index, rows)
    out = packing.batch_features(tokens, doc_ids, pack_documents=True)
    # Every target inside the prefix is seen by the prefix's bidirectional attention.
    return dict(
        out,
        prefix_mask=prefix[:, :-1].astype(np.int32),
        weights=out["weights"] * ~prefix[:, 1:],
    )


def corrupt_rows(objective: Objective, tokens, doc_ids, index: int, rows: np.ndarray):
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


def _windows(batch: dict):
    """The windows (tokens, document ids) [B, T+1] a batch was made from: its inputs and
    the last target. That target is its input's document when it has weight, else the
    start of the next document (pack_documents) or padding (token 0; a next document
    beginning with id 0 is dropped: only Hugging Face vocabularies have text at id 0)."""
    tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    segments = batch["segment_ids"].astype(np.int64)
    last = np.where(batch["weights"][:, -1] > 0, segments[:, -1], segments[:, -1] + 1)
    last = np.where((segments[:, -1] > 0) & (tokens[:, -1] > 0), last, 0)
    docs = np.concatenate([segments, last[:, None]], axis=1)
    return tokens, np.where(docs > 0, docs, packing.PAD_DOC)


def _runs(doc_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each document (run of one id, not padding) of a row."""
    edges = np.flatnonzero(np.diff(doc_ids)) + 1
    bounds = zip(np.concatenate([[0], edges]).tolist(), np.append(edges, len(doc_ids)).tolist())
    return [(s, e) for s, e in bounds if doc_ids[s] != packing.PAD_DOC]


def corrupt(objective: Objective, tokens: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption of one document: (inputs with sentinels, targets with
    sentinels). Spans alternate non-noise, noise, ... (T5's random_spans_noise_mask), so
    a document ends in noise; its noise spans and non-noise spans have random positive
    lengths. A document too short for one span (max_spans = 0) is all input, no target."""
    length = len(tokens)
    spans = min(max_spans(objective, length), length // 2)
    if spans == 0:
        return tokens, tokens[:0]
    noise = int(np.clip(round(length * objective.noise_density), spans, length - spans))
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


ATTENTION = {"clm": "causal", "mlm": "bidirectional", "prefix_lm": "prefix"}


def check_config(config, attention_mask: str) -> None:
    """The refusals of an objective that need other sections (training/config.py calls it
    before compiling); the vocabulary is checked when the pipeline opens the tokenizer."""
    train = config.train
    name = train.objective
    wanted = ATTENTION.get(name, "prefix")
    if attention_mask != wanted:
        why = {
            "causal": "next-token prediction must not see the tokens it predicts",
            "bidirectional": "a masked token is predicted from both sides",
            "prefix": "the prefix is read bidirectionally, the rest causally",
        }[wanted]
        raise UserError(
            f"train.objective={name} needs model.attention_mask={wanted}, not "
            f"{attention_mask} ({why}); set both."
        )
    if train.mlm_mask_token + train.mlm_random_token > 1:
        raise UserError(
            f"train.mlm_mask_token={train.mlm_mask_token} + train.mlm_random_token="
            f"{train.mlm_random_token} exceeds 1: they are shares of the masked tokens "
            "(the rest stay unchanged)."
        )
    if name != "clm" and config.data.source == "sft":
        raise UserError(
            f"train.objective={name} with data.source=sft: fine-tuning learns responses by "
            "next-token prediction; use train.objective=clm, or a text source."
        )
    if name != "clm" and config.distill.teacher:
        raise UserError(
            f"train.objective={name} with distill.teacher: the teacher's predictions are "
            "next-token ones; distill with train.objective=clm."
        )
