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
                   With model.encoder_layers > 0 it is T5's own form: each row's raw
                   window (its documents back to back, each ending in eos) is one example,
                   as in T5's pretraining: the encoder reads it with each noise span
                   replaced by its sentinel, then eos (data.encoder_seq_len tokens); the
                   decoder's targets are "<extra_id_0> span 0 <extra_id_1> span 1 ... eos"
                   and its inputs the targets shifted right behind the tokenizer's bos id
                   (the start token), weights 1 on every target (data.seq_len tokens). One
                   example per row, segment id 1 on both sides: the encoder attends across
                   the window's documents, as T5's does. The window is the longest whose
                   corruption always fits both lengths (raw_seq_len): nothing is ever cut.
                   Needs model.attention_mask=causal (the decoder's; the encoder is
                   bidirectional). The only objective of an encoder-decoder. The span
                   sampler and both forms' rows are data/spans.py's.

Mask and sentinel ids are tokenizer pieces: `<mask>` and `<extra_id_0>`, ... (T5's names),
reserved by `python -m data.tokenizer --extra_ids=N`, or an imported tokenizer.json's own
mask_token and <extra_id_k> tokens.
"""

import dataclasses
import numpy as np

from data import packing, spans
from data.shuffle import hash_ints
from data.spans import corrupt_rows, max_spans
from errors import UserError

OBJECTIVES = ("clm", "mlm", "prefix_lm", "span_corruption")
EVAL_SEED = 0  # evaluation batches are the same at every evaluation of every run
_SELECT, _KIND, _RANDOM, _PREFIX = range(4)  # hash domains (data/spans.py's is 4)
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
    encoder_seq_len: int = 0  # > 0: an encoder-decoder's encoder row length
    start_id: int | None = None  # an encoder-decoder's decoder start token (bos)
    eos_id: int | None = None  # appended to an encoder-decoder's inputs and targets


def from_config(train, seq_len: int, tokenizer, seed: int, encoder_seq_len: int = 0) -> Objective:
    """The Objective of `train` (config.train) with `tokenizer`'s reserved ids; UserError when
    the tokenizer lacks the ids the objective needs. `encoder_seq_len` > 0: the batches of an
    encoder-decoder (data/config.encoder_length)."""
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
        encoder_seq_len=encoder_seq_len,
        start_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )
    check_vocabulary(objective, tokenizer.path)
    return objective


def check_vocabulary(objective: Objective, tokenizer_path: str) -> None:
    """UserError unless the vocabulary has the mask or sentinel ids the objective uses."""
    if objective.encoder_seq_len and objective.start_id is None:
        raise UserError(
            f"train.objective={objective.name} for an encoder-decoder starts the decoder with "
            f"the bos id; data.tokenizer {tokenizer_path!r} has none: give a tokenizer with a "
            "bos_token (`python -m data.tokenizer` makes one)."
        )
    if objective.name == "mlm":
        needed, have = 1, int(objective.mask_id is not None)
        what = "a <mask> id (a mask_token)"
    elif objective.name == "span_corruption":
        needed = max_spans(objective, raw_seq_len(objective) + 1)
        have = len(objective.sentinel_ids)
        lengths = f"data.seq_len={objective.seq_len}"
        if objective.encoder_seq_len:
            lengths += f", encoder length {objective.encoder_seq_len}"
        what = f"{needed} sentinel ids <extra_id_0>... (for {lengths})"
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
    tokens, W + 2 * max_spans(W) <= seq_len + 1 (T5's random_spans_helper, for one row);
    for an encoder-decoder's, spans.encoder_decoder_window's."""
    width = objective.seq_len + 1
    if objective.name != "span_corruption":
        return objective.seq_len
    if objective.encoder_seq_len:
        return spans.encoder_decoder_window(objective) - 1
    length = width
    while length > 2 and length + 2 * max_spans(objective, length) > width:
        length -= 1
    return length - 1


def apply(objective: Objective, batch: dict, index: int, first_row: int) -> dict:
    """`batch` (rows first_row, first_row + 1, ... of global batch `index`) under `objective`."""
    if objective.name == "clm":
        return batch
    rows = first_row + np.arange(batch["inputs"].shape[0])
    transform = {"mlm": mlm, "prefix_lm": prefix_lm, "span_corruption": span_corruption}
    if objective.encoder_seq_len:
        transform["span_corruption"] = encoder_decoder_span_corruption
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


def encoder_decoder_span_corruption(objective: Objective, batch, index: int, rows) -> dict:
    return spans.encoder_decoder_rows(objective, *_windows(batch), index, rows)


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


ATTENTION = {"clm": "causal", "mlm": "bidirectional", "prefix_lm": "prefix"}


def check_config(config, model_config) -> None:
    """The refusals of an objective that need other sections (training/config.py calls it
    before compiling, with the checked ModelConfig); the vocabulary is checked when the
    pipeline opens the tokenizer."""
    train = config.train
    name = train.objective
    _check_encoder_decoder(config, model_config)
    # An encoder-decoder's decoder writes the spans left to right; its encoder is bidirectional.
    wanted = "causal" if model_config.encoder_layers else ATTENTION.get(name, "prefix")
    attention_mask = model_config.attention_mask
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


def _check_encoder_decoder(config, model_config) -> None:
    """An encoder-decoder learns by span corruption, with an encoder length the model can
    read; a decoder-only model has no encoder length."""
    layers, name = model_config.encoder_layers, config.train.objective
    length = config.data.encoder_seq_len
    if layers and name != "span_corruption":
        raise UserError(
            f"train.objective={name} with model.encoder_layers={layers}: an encoder-decoder "
            "learns by span_corruption (the encoder reads the corrupted text, the decoder writes "
            "its spans); set train.objective=span_corruption, or model.encoder_layers=0."
        )
    if not layers and length:
        raise UserError(
            f"data.encoder_seq_len={length} with model.encoder_layers=0: only an "
            "encoder-decoder has an encoder; set data.encoder_seq_len=0."
        )
    if length > model_config.max_seq_len:
        raise UserError(
            f"data.encoder_seq_len={length} is longer than "
            f"model.max_seq_len={model_config.max_seq_len}."
        )
