"""Sources: TFDS offline, the stdlib default, and every kind of bad input."""

import collections
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import sources
from data.config import default_data_config
from data.pipeline import make_eval_batches, make_train_iterator
from data.tokenizer import Tokenizer
from errors import UserError

EOS = 2


def _tokens(batches, tok=None):
    """All real tokens (pack_documents=False batches), in order."""
    out = []
    for b in batches:
        windows = np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)
        real = np.concatenate([b["segment_ids"][:, :1] > 0, b["weights"] > 0], axis=1)
        out.extend(t for row, mask in zip(windows, real) for t in row[mask].tolist())
    return out


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS dataset built offline from local strings."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    train = [(i, {"body": f"train document {i} " * (1 + i % 7)}) for i in range(40)]
    valid = [(i, {"body": f"validation document {i}"}) for i in range(5)]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="local_text",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
        split_datasets={"train": train, "validation": valid},
        data_dir=data_dir,
    )
    return data_dir, [ex["body"] for _, ex in train], [ex["body"] for _, ex in valid]


def _tfds_config(data_dir, **overrides):
    cfg = default_data_config()
    cfg.update(
        {
            **dict(
                pipeline="stream",
                source="tfds",
                tfds_name="local_text",
                tfds_data_dir=data_dir,
                tfds_text_key="body",
                seq_len=16,
                pack_documents=False,
                shuffle_buffer=16,
            ),
            **overrides,
        }
    )
    return cfg


def _epoch(it):
    batches = []
    while True:
        b = next(it)
        if it.get_state()["epoch"]:
            return batches
        batches.append(b)


def test_tfds_source_works_offline_and_shards_by_process(tfds_dir):
    data_dir, train, valid = tfds_dir
    tok = Tokenizer()
    expected = lambda docs: collections.Counter(t for d in docs for t in tok.encode(d) + [EOS])
    cfg = _tfds_config(data_dir)
    assert collections.Counter(_tokens(make_eval_batches(cfg, global_batch_size=2))) == expected(
        valid
    )
    epochs = [
        _epoch(
            make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=p, process_count=2)
        )
        for p in (0, 1, 0)
    ]
    shards = [collections.Counter(_tokens(batches)) for batches in epochs[:2]]
    assert shards[0] and shards[1]
    assert _tokens(epochs[0]) == _tokens(epochs[2])  # deterministic
    assert shards[0] + shards[1] == expected(train)


def test_tfds_source_prepares_a_token_cache_offline(tfds_dir, tmp_path):
    data_dir, train, valid = tfds_dir
    tok = Tokenizer()
    cfg = _tfds_config(data_dir, pipeline="cache", cache_dir=str(tmp_path / "cache"))
    eval_tokens = _tokens(make_eval_batches(cfg, global_batch_size=2))
    expected = lambda docs: collections.Counter(t for d in docs for t in tok.encode(d) + [EOS])
    assert collections.Counter(eval_tokens) == expected(valid)
    assert eval_tokens == _tokens(make_eval_batches(_tfds_config(data_dir), global_batch_size=2))
    it = make_train_iterator(cfg, global_batch_size=1, seed=0)
    epoch = [next(it)]
    while it.get_state()["epoch"] == 0:  # its position: that of the next window
        epoch.append(next(it))
    assert collections.Counter(_tokens(epoch)) == expected(train)


@pytest.mark.parametrize("pipeline", ["stream", "cache"])
def test_tfds_unknown_name_split_or_key_is_a_clear_error(tfds_dir, tmp_path, pipeline):
    data_dir = tfds_dir[0]
    where = dict(pipeline=pipeline, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        UserError, match="data.tfds_name: cannot find TFDS dataset 'no_such_dataset'"
    ):
        make_eval_batches(
            _tfds_config(data_dir, tfds_name="no_such_dataset", **where), global_batch_size=2
        )
    with pytest.raises(
        UserError, match=r"data.tfds_text_key: 'text' is not a feature .*\['body'\]"
    ):
        make_eval_batches(
            _tfds_config(data_dir, tfds_text_key="text", **where), global_batch_size=2
        )
    with pytest.raises(UserError, match="data.tfds_eval_split: 'test' is not a split"):
        make_eval_batches(
            _tfds_config(data_dir, tfds_eval_split="test", **where), global_batch_size=2
        )
    assert not os.path.exists(tmp_path / "cache")  # nothing half-prepared is left


def test_stdlib_default_has_disjoint_nonempty_splits():
    train, valid = sources.stdlib_files("train"), sources.stdlib_files("eval")
    assert train and valid and not set(train) & set(valid)
    assert not any("site-packages" in f for f in train + valid)
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.05
    cfg = default_data_config()
    cfg.update(seq_len=32, shuffle_buffer=8, eval_max_batches=1)
    batch = next(make_train_iterator(cfg, global_batch_size=2, seed=0))
    assert batch["weights"].sum() > 0
    (eval_batch,) = list(make_eval_batches(cfg, global_batch_size=2))
    assert eval_batch["weights"].sum() > 0


def _files_config(tmp_path, **overrides):
    cfg = default_data_config()
    cfg.update(
        {
            **dict(
                pipeline="stream",
                cache_dir=str(tmp_path / "cache"),
                source="files",
                train_files=str(tmp_path / "*.txt"),
                eval_files=str(tmp_path / "*.txt"),
                seq_len=8,
                shuffle_buffer=8,
            ),
            **overrides,
        }
    )
    return cfg


def test_missing_paths_and_empty_globs(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    cfg = _files_config(tmp_path, train_files=f"{tmp_path}/a.txt,{tmp_path}/missing/*.txt")
    with pytest.raises(UserError, match=r"data.train_files=.*'.*missing/\*.txt' matches no file"):
        make_train_iterator(cfg, global_batch_size=2, seed=0)
    cfg = _files_config(tmp_path, eval_files="")
    with pytest.raises(UserError, match="data.eval_files='': is empty"):
        make_eval_batches(cfg, global_batch_size=2)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("\n  \n\n")
    (tmp_path / "b.txt").write_text("")
    cfg = _files_config(tmp_path, file_format="lines")
    with pytest.raises(UserError, match="data.train_files: process 0 of 1 got no tokens"):
        next(make_train_iterator(cfg, global_batch_size=2, seed=0))
    with pytest.raises(UserError, match="data.eval_files: the eval split has no tokens"):
        list(make_eval_batches(cfg, global_batch_size=2))
    # The cache pipeline's case is in test_data_cache.py.


@pytest.mark.parametrize("pipeline", ["stream", "cache"])
def test_invalid_utf8_is_replaced_counted_and_warned_once(tmp_path, caplog, pipeline):
    (tmp_path / "a.txt").write_bytes(b"good text\n")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes\n")
    (tmp_path / "c.txt").write_bytes(b"also \xc3 bad\n")
    cfg = _files_config(tmp_path, pack_documents=False, pipeline=pipeline)
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        stream = make_eval_batches(cfg, global_batch_size=2)  # the cache is prepared here
        tokens = _tokens(stream)
    tok = Tokenizer()
    assert (
        tok.decode(tokens).replace("</s>", "")
        == "good text\nbad \ufffd\ufffd bytes\nalso \ufffd bad\n"
    )
    assert stream.invalid_utf8_documents == 2
    warnings = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and "b.txt" in warnings[0]


def test_tokenizer_larger_than_model_vocab(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(
        UserError, match="data.tokenizer: .* has 8000 pieces but the model's vocab_size is 512"
    ):
        make_train_iterator(
            _files_config(tmp_path), global_batch_size=2, seed=0, model_vocab_size=512
        )
    make_train_iterator(_files_config(tmp_path), global_batch_size=2, seed=0, model_vocab_size=8192)


def test_batch_not_divisible_by_processes_and_bad_fields(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="global_batch_size 5 is not divisible by process_count 2"):
        make_train_iterator(_files_config(tmp_path), global_batch_size=5, seed=0, process_count=2)
    with pytest.raises(UserError, match="data.source='web': must be one of stdlib, files, tfds"):
        make_train_iterator(_files_config(tmp_path, source="web"), global_batch_size=2, seed=0)
    with pytest.raises(UserError, match="data.file_format='csv': must be one of"):
        make_train_iterator(_files_config(tmp_path, file_format="csv"), global_batch_size=2, seed=0)


def test_tokenizer_command_trains_from_a_tfds_split(tfds_dir, tmp_path):
    from data.tokenizer import main

    output = str(tmp_path / "tfds_char.model")
    main(
        [
            "--input=tfds:local_text",
            f"--tfds_data_dir={tfds_dir[0]}",
            "--tfds_text_key=body",
            "--model_type=char",
            "--vocab_size=40",
            f"--output={output}",
        ]
    )
    tok = Tokenizer(output)
    assert 3 not in tok.encode("train document 12")  # every character was seen
    assert 3 in tok.encode("train document Z")  # 'Z' was not: char models have no byte fallback
