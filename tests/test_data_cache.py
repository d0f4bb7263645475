"""The token cache pipeline: preparation, the global shuffle, exact resume on any process
count, and every kind of bad cache (each made to happen)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import prepare, shuffle, token_cache
from data.pipeline import make_eval_batches, make_train_iterator
from data.tokenizer import Tokenizer, train_tokenizer
from errors import UserError
from tests.test_data_pipeline import (
    SEQ_LEN,
    _assert_same,
    _config,
    _docs,
    _expected_stream,
    _take,
    assert_document_masks,
)

WINDOW = SEQ_LEN + 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("pipeline", "cache_dir", "source", "train_files", "eval_files", "file_format", "seq_len")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _cache_config(tmp_path, docs=None, **overrides):
    overrides = {"pipeline": "cache", "pack_documents": False, **overrides}
    return _config(tmp_path, docs or _docs(30), files=2, **overrides)


def _windows(batches) -> list[tuple]:
    """Each row's seq_len + 1 tokens, padding included (pack_documents=False batches)."""
    return [
        tuple(row)
        for b in batches
        for row in np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1).tolist()
    ]


def _expected_windows(tok, docs, files=2) -> list[tuple]:
    """The corpus (files in order, a document per line) cut every WINDOW tokens, padded."""
    stream = [t for f in range(files) for t in _expected_stream(tok, docs[f::files])]
    stream += [0] * (-len(stream) % WINDOW)
    return [tuple(stream[i : i + WINDOW]) for i in range(0, len(stream), WINDOW)]


def _state(it) -> dict:
    return json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it


def test_prepare_writes_shards_and_a_manifest_that_read_back_exactly(tmp_path, tok):
    docs = _docs(30)
    cfg = _cache_config(tmp_path, docs)
    ident = prepare.identity(cfg, tok)
    directory = prepare.cache_directory(cfg, ident)
    prepare.prepare(cfg, tok, directory, ident, shard_tokens=50)  # many shards
    manifest = token_cache.read_manifest(directory)
    train = manifest["splits"]["train"]
    assert manifest["identity"]["tokenizer"]["sha256"] == tok.sha256
    assert manifest["identity"]["source"]["train"]["files"] == 2
    assert manifest["dtype"] == "uint16" and train["documents"] == len(docs)
    expected = _expected_windows(tok, docs)
    assert train["tokens"] == len([t for w in expected for t in w if t])
    assert len(train["shards"]) > 3
    for shard in train["shards"]:
        assert os.path.getsize(os.path.join(directory, shard["file"])) == 2 * shard["tokens"]
    split = token_cache.open_split(directory, manifest, "train")
    tokens, doc_ids = split.read(np.arange(len(expected)) * WINDOW, WINDOW)  # across shard ends
    assert [tuple(row) for row in tokens.tolist()] == expected
    eos_before = np.concatenate([[False], tokens.ravel()[:-1] == 2])[doc_ids.ravel() >= 0]
    assert (np.diff(doc_ids.ravel()[doc_ids.ravel() >= 0]) == eos_before[1:]).all()


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    assert (
        token_cache.token_dtype(2**16) == "uint16"
        and token_cache.token_dtype(2**16 + 1) == "uint32"
    )
    writer = token_cache.SplitWriter(str(tmp_path), "train", "uint32", shard_tokens=3)
    writer.add(np.array([70000, 5, 2, 99999, 2]), np.array([3, 2]))
    manifest = {"dtype": "uint32", "splits": {"train": writer.close(0)}}
    tokens, doc_ids = token_cache.open_split(str(tmp_path), manifest, "train").read([0], 6)
    np.testing.assert_array_equal(tokens, [[70000, 5, 2, 99999, 2, 0]])
    np.testing.assert_array_equal(doc_ids, [[0, 0, 0, 1, 1, -1]])


def test_permute_is_a_bijection_chosen_by_its_key():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        orders = [shuffle.permute(np.arange(n), n, shuffle.hash_ints(seed)) for seed in (0, 1)]
        assert sorted(orders[0].tolist()) == list(range(n))
        if n >= 7:
            assert (orders[0] != orders[1]).any() and (orders[0] != np.arange(n)).any()
    order = shuffle.permute(np.arange(10_000), 10_000, shuffle.hash_ints(5))
    assert abs(np.corrcoef(order, np.arange(10_000))[0, 1]) < 0.05  # not a near-identity


def test_each_epoch_is_a_seeded_permutation_of_every_window(tmp_path, tok):
    docs = _docs(30)
    cfg = _cache_config(tmp_path, docs)
    expected = _expected_windows(tok, docs)
    n = len(expected)
    one = _windows(_take(make_train_iterator(cfg, global_batch_size=1, seed=1), 2 * n))
    epochs = one[:n], one[n:]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(expected)  # each window once
    assert epochs[0] != epochs[1] and epochs[0] != expected  # reshuffled, not in corpus order
    other_seed = _windows(_take(make_train_iterator(cfg, global_batch_size=1, seed=2), n))
    assert sorted(other_seed) == sorted(expected) and other_seed != epochs[0]
    # Batches straddle the epoch boundary: global batch i is windows [i*B, (i+1)*B).
    threes = _windows(_take(make_train_iterator(cfg, global_batch_size=3, seed=1), 2 * n // 3))
    assert threes == one[: len(threes)]


def test_global_batches_are_the_same_on_any_process_count_and_resume_across_counts(tmp_path):
    cfg = _cache_config(tmp_path, pack_documents=True)
    make = lambda p, count: make_train_iterator(
        cfg, global_batch_size=4, seed=3, process_index=p, process_count=count
    )
    whole, halves = make(0, 1), [make(0, 2), make(1, 2)]
    for _ in range(25):  # past the end of epoch 0
        rows = [next(h) for h in halves]
        assert rows[0]["inputs"].shape == (2, SEQ_LEN)
        joined = {k: np.concatenate([rows[0][k], rows[1][k]]) for k in rows[0]}
        _assert_same([next(whole)], [joined])
        assert _state(whole) == _state(halves[0]) == _state(halves[1])
    assert _state(whole)["epoch"] >= 1
    # Saved by one process, resumed by two, and by one with another batch size.
    state, ahead = _state(whole), _take(whole, 3)
    resumed = [make(0, 2), make(1, 2)]
    for it in resumed:
        it.set_state(state)
    for batch in ahead:
        rows = [next(it) for it in resumed]
        _assert_same([batch], [{k: np.concatenate([rows[0][k], rows[1][k]]) for k in batch}])
    doubled = make_train_iterator(cfg, global_batch_size=8, seed=3)
    doubled.set_state(state)
    np.testing.assert_array_equal(
        next(doubled)["inputs"], np.concatenate([b["inputs"] for b in ahead[:2]])
    )


def test_restore_anywhere_continues_bit_identically(tmp_path):
    cfg = _cache_config(tmp_path, pack_documents=True)
    it = make_train_iterator(cfg, global_batch_size=4, seed=7)
    states, batches = [], []
    for _ in range(30):
        states.append(_state(it))
        batches.append(next(it))
    boundary = next(k for k, state in enumerate(states) if state["epoch"] == 1)
    for k in (0, 1, boundary - 1, boundary, boundary + 1, 29):
        rebuilt = make_train_iterator(cfg, global_batch_size=4, seed=7)
        rebuilt.set_state(states[k])
        _assert_same(_take(rebuilt, 30 - k), batches[k:])
    it.set_state(states[5])  # rewinding the same iterator
    _assert_same(_take(it, 2), batches[5:7])
    other = make_train_iterator(cfg, global_batch_size=4, seed=8)
    with pytest.raises(UserError, match="does not match this pipeline.*seed"):
        other.set_state(states[5])


@pytest.mark.parametrize("sampling", ["permutation", "random_offsets"])
def test_document_masks_in_train_batches(tmp_path, sampling):
    cfg = _cache_config(tmp_path, pack_documents=True, sampling=sampling)
    for batch in _take(make_train_iterator(cfg, global_batch_size=8, seed=0), 10):
        assert_document_masks(batch)


def test_random_offsets_sample_windows_anywhere_deterministically(tmp_path, tok):
    docs = _docs(30)
    cfg = _cache_config(tmp_path, docs, sampling="random_offsets")
    corpus = [t for w in _expected_windows(tok, docs) for t in w]
    take = lambda seed: _windows(
        _take(make_train_iterator(cfg, global_batch_size=4, seed=seed), 20)
    )
    windows = take(0)
    offsets = [
        next(o for o in range(len(corpus)) if tuple(corpus[o : o + WINDOW]) == w) for w in windows
    ]
    assert any(o % WINDOW for o in offsets)  # not only the permutation's window starts
    assert len(set(offsets)) > 70 and take(0) == windows and take(1) != windows
    it = make_train_iterator(cfg, global_batch_size=4, seed=0)
    _take(it, 7)
    resumed = make_train_iterator(cfg, global_batch_size=4, seed=0)
    resumed.set_state(_state(it))
    _assert_same(_take(resumed, 3), _take(it, 3))


def _prepared(tmp_path, docs=None):
    """A prepared cache: (config, its directory, its train shard's path)."""
    cfg = _cache_config(tmp_path, docs)
    list(make_eval_batches(cfg, global_batch_size=4))
    directory = str(tmp_path / "cache")
    return cfg, directory, os.path.join(directory, "train-00000.tokens")


def _refused(cfg, *patterns) -> str:
    with pytest.raises(UserError) as error:
        make_train_iterator(cfg, global_batch_size=4, seed=0)
    message = str(error.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_a_truncated_or_edited_shard_is_named_and_never_used_or_rewritten(tmp_path):
    cfg, directory, shard = _prepared(tmp_path)
    original = open(shard, "rb").read()
    with open(shard, "r+b") as f:
        f.truncate(len(original) - 6)
    _refused(cfg, shard, "truncated", f"delete {directory}", "python -m data.prepare")
    assert os.path.getsize(shard) == len(original) - 6  # nothing repaired or re-tokenized
    with open(shard, "wb") as f:
        f.write(original[:10] + bytes([original[10] ^ 1]) + original[11:])
    _refused(cfg, shard, "does not match the sha256", f"delete {directory}")
    with open(shard, "wb") as f:
        f.write(original)
    next(make_train_iterator(cfg, global_batch_size=4, seed=0))  # intact again: used


def test_a_cache_from_another_tokenizer_or_source_is_refused(tmp_path):
    cfg, directory, shard = _prepared(tmp_path)
    before = os.stat(os.path.join(directory, token_cache.MANIFEST)).st_mtime_ns
    texts = ["".join(_docs(30))]
    char = train_tokenizer(texts, str(tmp_path / "char.model"), vocab_size=40, model_type="char")
    cfg.tokenizer = char.path
    _refused(cfg, os.path.join(directory, "manifest.json"), "another tokenizer", char.path)
    cfg.tokenizer = ""
    with open(tmp_path / "train0.txt", "a") as f:
        f.write("one more line\n")
    _refused(cfg, "another source", "source.train.bytes", f"delete {directory}")
    assert os.stat(os.path.join(directory, token_cache.MANIFEST)).st_mtime_ns == before
    cfg.cache_dir = ""  # the default location is keyed by source and tokenizer: never mixed
    assert prepare.cache_directory(cfg, prepare.identity(cfg, Tokenizer())) != directory


def test_an_unwritable_or_foreign_cache_dir_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = _cache_config(tmp_path, cache_dir=str(tmp_path / "a_file" / "cache"))
    _refused(cfg, "data.cache_dir=", "cannot write the token cache", "writable directory")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    cfg.cache_dir = str(tmp_path / "notes")
    _refused(cfg, "not a token cache", "new or empty directory")
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]


def test_an_empty_corpus_or_one_smaller_than_a_batch_is_refused(tmp_path):
    cfg = _cache_config(tmp_path, ["", "   ", ""])
    _refused(cfg, "data.train_files", "no text", "add text")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("cache")]
    cfg = _cache_config(tmp_path, ["just a few words", "and a few more"])
    _refused(cfg, "data.train_files", "fewer than one batch of 4", "train.global_batch_size")


def test_an_interrupted_preparation_leaves_nothing_that_looks_prepared(tmp_path, monkeypatch):
    cfg = _cache_config(tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_train_iterator(cfg, global_batch_size=4, seed=0)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("cache")]
    monkeypatch.undo()
    next(make_train_iterator(cfg, global_batch_size=4, seed=0))
    assert [name for name in os.listdir(tmp_path) if name.startswith("cache")] == ["cache"]


def test_the_prepare_command_prepares_what_training_reads_and_reports_bad_caches(tmp_path):
    cfg = _cache_config(tmp_path)
    flags = [f"--config.data.{k}={v}" for k, v in cfg.items() if k in FLAGS]
    command = [sys.executable, "-m", "data.prepare", *flags]
    run = lambda: subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    result = run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"prepared: {tmp_path / 'cache'}" in result.stdout
        and "train: 30 documents" in result.stdout
    )
    next(make_train_iterator(cfg, global_batch_size=4, seed=0))  # what training reads
    shard = tmp_path / "cache" / "eval-00000.tokens"
    with open(shard, "r+b") as f:
        f.truncate(10)
    result = run()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(shard) in errors[0] and "truncated" in errors[0]


def test_reading_a_token_cache_imports_no_tensorflow(tmp_path):
    """The cache pipeline (token_cache -> windows -> packing) reads batches in numpy alone, in
    a fresh process; they are the batches training reads."""
    cfg, directory, _ = _prepared(tmp_path)
    expected = next(make_train_iterator(cfg, global_batch_size=4, seed=0))
    fields = {k: cfg[k] for k in ("source", "seq_len", "sampling", "pack_documents")}
    code = f"""
import json, sys, types
from data import token_cache, windows
cfg = types.SimpleNamespace(**{fields!r}, eval_max_batches=0)
manifest = token_cache.read_manifest({directory!r})
split = lambda name: token_cache.open_split({directory!r}, manifest, name)
one = dict(global_batch_size=4, process_index=0, process_count=1)
batch = next(windows.TrainIterator(split("train"), cfg, "", seed=0, **one))
assert list(windows.EvalStream(split("eval"), cfg, **one))
assert "tensorflow" not in sys.modules, "TensorFlow imported"
print(json.dumps({{k: v.tolist() for k, v in batch.items()}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    batch = json.loads(result.stdout.splitlines()[-1])
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
