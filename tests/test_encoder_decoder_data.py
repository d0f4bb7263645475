"""An encoder-decoder's data side: the batch format's encoder fields, T5's span corruption
for an encoder-decoder (data/spans.py), its refusals, and a tiny encoder-decoder run that
learns (test_objectives.py's mlm run resumes exactly through the same objective path)."""

import json

import jax
import numpy as np
import pytest

from data import objectives, spans
from data.batch import BATCH_FIELDS, ENCODER_FIELDS, batch_spec, make_batch, random_batch
from data.pipeline import make_eval_batches, make_train_iterator
from errors import UserError
from tests import test_objectives
from tests.helpers import tiny_config
from tests.test_objectives import SENTINELS, corpus_config, packed_batch
from training import loop
from training.config import validate_config

BOS, EOS = 1, 2
corpus = test_objectives.corpus  # its fixture: short lines, a tokenizer with 16 sentinels


def seq2seq(seq_len=32, encoder_seq_len=48, density=0.3, mean=2.0, seed=3):
    return objectives.Objective(
        "span_corruption",
        seed,
        seq_len,
        noise_density=density,
        mean_span_length=mean,
        sentinel_ids=SENTINELS,
        encoder_seq_len=encoder_seq_len,
        start_id=BOS,
        eos_id=EOS,
    )


def seq2seq_config(corpus, **model):
    """A tiny encoder-decoder (one encoder block) trained by span corruption on the corpus."""
    config = corpus_config(corpus, objective="span_corruption", attention_mask="causal")
    config.model.update(encoder_layers=1, max_seq_len=32, **model)
    config.data.encoder_seq_len = 24
    config.train.update(span_noise_density=0.4, span_mean_length=2.0)  # spans in short rows
    return config


def test_batch_spec_and_make_batch_with_and_without_the_encoder_group():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = batch_spec(4, 8, sharding)
    assert set(spec) == set(BATCH_FIELDS)  # decoder-only: no encoder field sent anywhere
    spec = batch_spec(4, 8, sharding, encoder_seq_len=6)
    assert set(spec) == set(BATCH_FIELDS) | set(ENCODER_FIELDS)
    assert all(spec[k].shape == (4, 6) and spec[k].sharding == sharding for k in ENCODER_FIELDS)
    assert all(spec[k].shape == (4, 8) for k in BATCH_FIELDS)
    batch = random_batch(4, 8, 50, encoder_seq_len=6)
    assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in spec.items()}
    assert {k: v.dtype for k, v in batch.items()} == {k: v.dtype for k, v in spec.items()}
    decoder = {k: v for k, v in batch.items() if k not in ENCODER_FIELDS}
    assert set(make_batch(**decoder)) == set(BATCH_FIELDS)
    assert set(make_batch(**batch)) == set(spec)
    with pytest.raises(KeyError):  # the encoder group is all or none
        make_batch(**{k: v for k, v in batch.items() if k != "encoder_positions"})
    with pytest.raises(KeyError):
        make_batch(**decoder, encoder_segment_ids=batch["encoder_segment_ids"])


def uncorrupt(inputs: list[int], targets: list[int]) -> list[int]:
    """The text: each sentinel of the inputs replaced by its span of the targets."""
    pieces, current = {}, None
    for token in targets:
        if token in SENTINELS:
            pieces[token] = current = []
        else:
            current.append(token)
    text = [t for token in inputs for t in (pieces.pop(token) if token in SENTINELS else [token])]
    assert not pieces  # every span used once
    return text


@pytest.mark.parametrize(
    "seq_len, encoder_seq_len, density, mean, max_doc",
    [
        (32, 48, 0.3, 2.0, 20),
        (114, 512, 0.15, 3.0, 300),  # T5's lengths: 568 raw tokens
        (64, 64, 0.5, 1.5, 5),
        (40, 16, 0.2, 1.0, 9),
    ],
)
def test_span_corruption_reconstructs_every_window_and_nothing_overflows_or_is_cut(
    seq_len, encoder_seq_len, density, mean, max_doc
):
    objective = seq2seq(seq_len, encoder_seq_len, density, mean)
    window = objectives.raw_seq_len(objective) + 1
    # The longest window whose corruption fits both sides, as T5's random_spans_helper.
    encoder, decoder = spans.encoder_decoder_lengths(objective, window)
    assert encoder <= encoder_seq_len and decoder <= seq_len
    longer = spans.encoder_decoder_lengths(objective, window + 1)
    assert longer[0] > encoder_seq_len or longer[1] > seq_len
    batch = packed_batch(8, window - 1, seed=seq_len + max_doc, max_doc=max_doc)
    batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}  # padding
    out = objectives.apply(objective, batch, index=2, first_row=0)
    assert out["inputs"].shape == (9, seq_len)
    assert out["encoder_inputs"].shape == (9, encoder_seq_len)
    assert not out["prefix_mask"].any()
    tokens, doc_ids = objectives._windows(batch)
    sentinels = 0
    for r in range(9):
        real = tokens[r][doc_ids[r] >= 0].tolist()
        enc_real, dec_real = out["encoder_segment_ids"][r] > 0, out["segment_ids"][r] > 0
        assert np.array_equal(enc_real, np.arange(encoder_seq_len) < enc_real.sum())
        assert np.array_equal(dec_real, np.arange(seq_len) < dec_real.sum())
        if not real:  # an all-padding row stays padding
            assert not enc_real.any() and not dec_real.any() and not out["weights"][r].any()
            continue
        inputs = out["encoder_inputs"][r][enc_real].tolist()
        targets = out["targets"][r][dec_real].tolist()
        assert inputs[-1] == EOS and targets[-1] == EOS  # T5: eos closes both sides
        assert uncorrupt(inputs[:-1], targets[:-1]) == real  # nothing lost, nothing cut
        used = np.isin(inputs, SENTINELS).sum()
        assert used == spans.span_counts(objective, len(real))[0] and targets[0] == SENTINELS[0]
        sentinels += used
        # The decoder reads its targets shifted right behind the start token (bos).
        assert out["inputs"][r][dec_real].tolist() == [BOS] + targets[:-1]
        assert np.array_equal(out["weights"][r], dec_real)
        assert np.array_equal(out["positions"][r][dec_real], np.arange(dec_real.sum()))
        assert np.array_equal(out["encoder_positions"][r][enc_real], np.arange(enc_real.sum()))
        assert not out["encoder_positions"][r][~enc_real].any()
    assert sentinels > 0


def test_span_corruption_draws_depend_on_seed_batch_and_global_row_only():
    objective = seq2seq()
    batch = packed_batch(16, objectives.raw_seq_len(objective), seed=1, max_doc=30)
    out = objectives.apply(objective, batch, index=5, first_row=0)
    again = objectives.apply(objective, batch, index=5, first_row=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    later = objectives.apply(objective, batch, index=6, first_row=0)
    reseeded = objectives.apply(seq2seq(seed=4), batch, index=5, first_row=0)
    assert not np.array_equal(out["encoder_inputs"], later["encoder_inputs"])
    assert not np.array_equal(out["encoder_inputs"], reseeded["encoder_inputs"])
    # A process holding rows 8..15 of the global batch draws what one process draws there.
    half = objectives.apply(objective, {k: v[8:] for k, v in batch.items()}, 5, first_row=8)
    assert all(np.array_equal(out[k][8:], half[k]) for k in out)


def test_pipeline_batches_are_equal_across_process_splits_and_evaluate_alike(corpus):
    config = seq2seq_config(corpus)
    kwargs = dict(model_vocab_size=320, train_config=config.train, encoder_seq_len=24)
    whole = next(make_train_iterator(config.data, global_batch_size=4, seed=0, **kwargs))
    assert whole["encoder_inputs"].shape == (4, 24) and whole["inputs"].shape == (4, 16)
    for p in range(2):
        part = make_train_iterator(
            config.data, global_batch_size=4, seed=0, process_index=p, process_count=2, **kwargs
        )
        assert all(np.array_equal(v, whole[k][2 * p : 2 * p + 2]) for k, v in next(part).items())
    first, second = (make_eval_batches(config.data, global_batch_size=4, **kwargs) for _ in "ab")
    first, second = list(first), list(second)
    assert len(first) == 2 and all(set(b) == set(whole) for b in first)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, second) for k in a)


REFUSALS = [  # (train.objective, model and data fields, message)
    ("clm", {}, "objective=clm with model.encoder_layers=1"),
    ("mlm", {}, "objective=mlm with model.encoder_layers=1"),
    ("prefix_lm", {}, "objective=prefix_lm with model.encoder_layers=1"),
    ("span_corruption", {"model.attention_mask": "prefix"}, "attention_mask=causal"),
    ("span_corruption", {"data.encoder_seq_len": 64}, "longer than model.max_seq_len"),
    ("span_corruption", {"model.encoder_layers": 0}, "only an encoder-decoder"),
    ("span_corruption", {"lora.rank": 4}, "fine-tune an encoder-decoder fully"),
]


@pytest.mark.parametrize("objective, fields, message", REFUSALS)
def test_invalid_combinations_are_refused_before_compiling(objective, fields, message):
    config = tiny_config(encoder_layers=1)
    config.data.encoder_seq_len = 16
    config.train.objective = objective
    for name, value in fields.items():
        section, key = name.split(".")
        config[section][key] = value
    with pytest.raises(UserError, match=message):
        validate_config(config, 8)


def test_rows_too_short_for_a_span_are_refused():
    with pytest.raises(UserError, match="too short for one noise span"):
        objectives.raw_seq_len(seq2seq(16, 16, density=0.15, mean=3.0))


def test_an_encoder_decoder_learns_by_span_corruption(corpus, tmp_path):
    """8 steps of train.py's loop (a checkpoint, an evaluation at the end)."""
    config = seq2seq_config(corpus)
    loop.train(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 9))
    assert all(np.isfinite(list(losses.values())))
    assert np.mean([losses[s] for s in (6, 7, 8)]) < losses[1] - 0.5
    evaluation = [r for r in records if "eval_loss" in r]
    assert evaluation and np.isfinite(evaluation[-1]["eval_loss"])
