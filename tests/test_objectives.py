"""train.objective: the mlm, prefix_lm and span_corruption transforms (data/objectives.py),
the tokenizer's reserved ids, the refusals, and an mlm run that learns and resumes exactly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import objectives, packing
from data.hf_tokenizer import HFTokenizer, save_for_transformers
from data.pipeline import make_train_iterator
from data.tokenizer import Tokenizer, train_tokenizer
from errors import UserError
from tests.helpers import tiny_config, train_until_killed
from tests.test_train_loop import REPO, checkpoint_steps
from training import loop
from training.config import TrainConfig, validate_config

SENTINELS = tuple(range(5, 105))
MLM = objectives.Objective(
    "mlm", seed=7, seq_len=512, mask_id=4, sentinel_ids=SENTINELS, text_ids=(105, 1000)
)


def packed_batch(rows: int, seq_len: int, seed: int, max_doc: int = 80) -> dict:
    """Windows of random documents (lengths 1..max_doc, ids >= 105) back to back, the last
    row ending in padding, as the pipeline packs them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(105, 1000, (rows, seq_len + 1))
    lengths = rng.integers(1, max_doc + 1, (rows, seq_len + 1))
    doc_ids = np.cumsum(np.arange(seq_len + 1) % lengths == 0, axis=1)
    doc_ids[-1, seq_len // 2 :] = packing.PAD_DOC
    tokens[-1, seq_len // 2 :] = 0
    return packing.batch_features(tokens, doc_ids, pack_documents=True)


def test_mlm_masks_at_the_rate_with_the_80_10_10_split_and_never_padding():
    batch = packed_batch(64, 512, seed=0)
    out = objectives.apply(MLM, batch, index=3, first_row=0)
    real = batch["segment_ids"] > 0
    chosen = out["weights"] > 0
    n, k = real.sum(), chosen.sum()
    assert not (chosen & ~real).any()  # never a padding position
    assert np.array_equal(out["targets"], batch["inputs"])  # the original, not shifted
    assert abs(k - 0.15 * n) < 4 * np.sqrt(n * 0.15 * 0.85)
    new, old = out["inputs"][chosen], batch["inputs"][chosen]
    shares = {
        "mask": (new == MLM.mask_id).mean(),
        "random": (new != old).mean() - (new == MLM.mask_id).mean(),
        "kept": (new == old).mean(),
    }
    tolerance = lambda p: 4 * np.sqrt(p * (1 - p) / k)  # noqa: E731
    draw_same = 0.1 / (1000 - 105)  # a random replacement that drew the original token
    assert abs(shares["mask"] - 0.8) < tolerance(0.8)
    assert abs(shares["random"] - (0.1 - draw_same)) < tolerance(0.1)
    assert abs(shares["kept"] - (0.1 + draw_same)) < tolerance(0.1)
    randoms = new[(new != old) & (new != MLM.mask_id)]
    assert randoms.min() >= 105 and randoms.max() < 1000  # text ids, never a special one
    assert np.array_equal(out["inputs"][~chosen], batch["inputs"][~chosen])


def test_mlm_draws_are_a_function_of_seed_batch_and_global_row():
    batch = packed_batch(16, 64, seed=1)
    out = objectives.apply(MLM, batch, index=5, first_row=0)
    again = objectives.apply(MLM, batch, index=5, first_row=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    later = objectives.apply(MLM, batch, index=6, first_row=0)
    reseeded = objectives.apply(objectives.Objective(**{**vars(MLM), "seed": 8}), batch, 5, 0)
    assert not np.array_equal(out["weights"], later["weights"])
    assert not np.array_equal(out["weights"], reseeded["weights"])
    # A process holding rows 8..15 of the global batch draws what one process draws there.
    half = objectives.apply(MLM, {k: v[8:] for k, v in batch.items()}, index=5, first_row=8)
    assert all(np.array_equal(out[k][8:], half[k]) for k in out)


@pytest.mark.parametrize("rule", ["uniform", "fixed"])
def test_prefix_lm_marks_each_documents_prefix_and_learns_only_after_it(rule):
    objective = objectives.Objective("prefix_lm", 0, 128, prefix_length=rule, prefix_fraction=0.3)
    batch = packed_batch(8, 128, seed=2, max_doc=40)
    out = objectives.apply(objective, batch, index=0, first_row=0)
    assert np.array_equal(out["targets"], batch["targets"])  # shifted, as clm
    for r in range(8):
        segments = batch["segment_ids"][r]
        for s in set(segments[segments > 0].tolist()):
            here = np.flatnonzero(segments == s)
            prefix = out["prefix_mask"][r, here]
            p = int(prefix.sum())
            assert np.array_equal(prefix, np.arange(len(here)) < p)  # one leading run
            assert 1 <= p <= max(len(here) - 1, 1)
            if rule == "fixed" and len(here) > 1:
                assert p == np.clip(round(0.3 * len(here)), 1, len(here) - 1)
            # No loss where the target is still in the prefix; the clm weights after it.
            expected = batch["weights"][r, here] * (np.arange(len(here)) >= p - 1)
            assert np.array_equal(out["weights"][r, here], expected)
    assert not out["prefix_mask"][batch["segment_ids"] == 0].any()
    # Documents of one length in one row: a uniform length is drawn for each of them.
    doc_ids = np.arange(129)[None] // 16
    same = packing.batch_features(np.ones((1, 129), int), doc_ids, pack_documents=True)
    prefixes = objectives.apply(objective, same, index=0, first_row=0)["prefix_mask"]
    distinct = len(set(prefixes.reshape(8, 16).sum(1).tolist()))
    assert distinct > 1 if rule == "uniform" else distinct == 1


def uncorrupt(tokens: np.ndarray, prefix: np.ndarray) -> list[int]:
    """A corrupted document's text: each sentinel of its inputs replaced by its span."""
    inputs, targets = tokens[prefix].tolist(), tokens[~prefix].tolist()
    spans, text = {}, []
    for token in targets:
        if token in SENTINELS:
            spans[token] = current = []
        else:
            current.append(token)
    for token in inputs:
        text.extend(spans.pop(token) if token in SENTINELS else [token])
    assert not spans  # every target span was used once
    return text


@pytest.mark.parametrize("seq_len, max_doc", [(128, 300), (128, 12), (512, 200)])
def test_span_corruption_reconstructs_every_document_and_never_overflows(seq_len, max_doc):
    objective = objectives.Objective("span_corruption", 3, seq_len, sentinel_ids=SENTINELS)
    raw = objectives.raw_seq_len(objective)  # one long document fills a row exactly
    assert raw + 1 + 2 * objectives.max_spans(objective, raw + 1) in (seq_len, seq_len + 1)
    batch = packed_batch(16, raw, seed=seq_len + max_doc, max_doc=max_doc)
    out = objectives.apply(objective, batch, index=1, first_row=0)
    windows = objectives._windows(batch)
    tokens, docs, prefix = objectives.corrupt_rows(objective, *windows, 1, np.arange(16))
    assert tokens.shape == (16, seq_len + 1)
    assert np.array_equal(out["inputs"], tokens[:, :-1])
    assert np.array_equal(out["prefix_mask"], prefix[:, :-1])
    assert np.array_equal(out["weights"] > 0, ~prefix[:, 1:] & (docs[:, 1:] >= 0))
    spans = 0
    for r in range(16):
        text = []
        for d in sorted(set(docs[r][docs[r] >= 0].tolist())):
            document = uncorrupt(tokens[r, docs[r] == d], prefix[r, docs[r] == d])
            used = np.isin(tokens[r, docs[r] == d], SENTINELS).sum() // 2  # T5's span count
            assert used == min(objectives.max_spans(objective, len(document)), len(document) // 2)
            text += document
            spans += used
        real = windows[0][r][windows[1][r] >= 0]
        assert text == real.tolist()  # every raw token, in order: nothing lost, nothing cut
    assert spans > 0


def test_span_corruption_batches_resume_exactly_from_the_token_cache(corpus):
    config = corpus_config(corpus, objective="span_corruption", attention_mask="prefix")
    config.data.seq_len = 64
    config.train.update(span_noise_density=0.5, span_mean_length=1.5)  # spans in short lines
    kwargs = dict(global_batch_size=4, seed=0, model_vocab_size=320, train_config=config.train)
    batches = make_train_iterator(config.data, **kwargs)
    next(batches)
    state = batches.get_state()
    expected = next(batches)
    resumed = make_train_iterator(config.data, **kwargs)
    resumed.set_state(json.loads(json.dumps(state)))
    actual = next(resumed)
    assert actual["inputs"].shape == (4, 64) and actual["prefix_mask"].any()
    assert np.isin(actual["inputs"], SENTINELS).any()
    assert all(np.array_equal(actual[k], expected[k]) for k in expected)


def test_the_tokenizer_reserves_mask_and_sentinels_only_when_asked(corpus):
    tokenizer = Tokenizer(corpus["tokenizer"])
    assert tokenizer.mask_id == 4 and tokenizer.sentinel_ids == list(range(5, 21))
    assert tokenizer.first_text_id == 21
    text = "a <mask> <extra_id_0> b"  # reserved pieces are never text's ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert not set(tokenizer.encode(text)) & set(range(4, 21))
    hf = HFTokenizer(corpus["hf_tokenizer"])  # the same ids through transformers' format
    assert (hf.mask_id, hf.sentinel_ids, hf.first_text_id) == (4, list(range(5, 21)), 21)
    default = Tokenizer()  # the bundled tokenizer: no reserved ids, "\n" still at 4
    assert (default.mask_id, default.sentinel_ids, default.encode("\n")) == (None, [], [4])


LINES = ["the cat sat on the mat.", "a dog ran to the park.", "we like red apples."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files of short sentences and a small BPE tokenizer with 16 sentinels trained on them."""
    root = tmp_path_factory.mktemp("objectives")
    rng = np.random.default_rng(0)
    for name, count in (("train.txt", 600), ("eval.txt", 60)):
        lines = [" ".join(LINES[i] for i in rng.integers(0, 3, 2)) for _ in range(count)]
        (root / name).write_text("\n".join(lines) + "\n")
    text = (root / "train.txt").read_text()
    path = str(root / "chars.model")
    train_tokenizer([text], path, vocab_size=300, extra_ids=16)
    save_for_transformers(path, str(root / "hf"), 64)
    return {"root": root, "tokenizer": path, "hf_tokenizer": str(root / "hf" / "tokenizer.json")}


def corpus_config(corpus, objective="mlm", attention_mask="bidirectional"):
    config = tiny_config(attention_mask=attention_mask, vocab_size=320)
    config.data.update(
        source="files",
        file_format="lines",
        train_files=str(corpus["root"] / "train.txt"),
        eval_files=str(corpus["root"] / "eval.txt"),
        tokenizer=corpus["tokenizer"],
        eval_max_batches=2,
    )
    config.train.update(objective=objective, eval_every=0, log_every=1, num_steps=8)
    config.checkpoint.update(every_steps=3, async_save=False)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)
    return config


@pytest.fixture(scope="module")
def mlm_run(corpus, tmp_path_factory):
    """An mlm run killed before step 6 (checkpoint at 3), then resumed to 8: its workdir and
    every record it logged."""
    workdir = str(tmp_path_factory.mktemp("mlm_run"))
    config = corpus_config(corpus)
    with pytest.MonkeyPatch.context() as monkeypatch:  # module scope: no fixture of its own
        train_until_killed(config, workdir, 6, monkeypatch)
    assert checkpoint_steps(workdir) == [3]
    loop.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return workdir, [json.loads(line) for line in f]


def test_an_mlm_run_learns_and_resumes_exactly_after_sigkill(mlm_run):
    _, records = mlm_run
    losses = {}
    for record in records:
        if "loss" in record:
            losses.setdefault(record["step"], []).append(record["loss"])
    assert sorted(losses) == list(range(1, 9))
    first, again = losses[4]  # logged before the kill and again after the resume
    assert first == again
    assert np.mean([losses[s][-1] for s in (6, 7, 8)]) < losses[1][0] - 0.5
    evaluation = [r for r in records if "eval_accuracy" in r]
    assert evaluation and 0 < evaluation[-1]["eval_accuracy"] <= 1


def test_sample_py_refuses_an_mlm_run(mlm_run):
    workdir, _ = mlm_run
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}", "--prompt=a"]
        + ["--max_new_tokens=2"],  # within the tiny model's 16 positions
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --workdir=")
    assert "masked LM" in result.stderr


REFUSALS = [
    (dict(objective="mlm"), "causal", "needs model.attention_mask=bidirectional"),
    (dict(objective="prefix_lm"), "bidirectional", "needs model.attention_mask=prefix"),
    (dict(objective="span_corruption"), "causal", "needs model.attention_mask=prefix"),
    (dict(objective="clm"), "bidirectional", "needs model.attention_mask=causal"),
    (dict(objective="mlm", mlm_mask_token=0.8, mlm_random_token=0.3), "bidirectional", "exceeds"),
]


@pytest.mark.parametrize("train, attention_mask, message", REFUSALS)
def test_invalid_combinations_are_refused_before_compiling(train, attention_mask, message):
    config = tiny_config(attention_mask=attention_mask)
    config.train.update(train)
    with pytest.raises(UserError, match=message):
        validate_config(config, 8)


def test_other_refusals(corpus):
    for rate in (0.0, 1.0):
        with pytest.raises(UserError, match="train.mlm_mask_rate"):
            TrainConfig(mlm_mask_rate=rate)
    config = tiny_config(attention_mask="bidirectional")
    config.train.objective = "mlm"
    config.data.update(source="sft", sft_file=__file__, sft_eval_file=__file__)
    with pytest.raises(UserError, match="data.source=sft"):
        validate_config(config, 8)
    train = corpus_config(corpus).train
    for tokenizer in (Tokenizer(), HFTokenizer(corpus["hf_tokenizer"])):
        for name, what in (("mlm", "<mask>"), ("span_corruption", "sentinel")):
            if name == "mlm" and tokenizer.mask_id is not None:
                continue
            train.objective = name
            with pytest.raises(UserError, match=f"objective={name} needs .*{what}.*--extra_ids"):
                objectives.from_config(train, 2048, tokenizer, seed=0)
