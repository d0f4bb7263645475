"""Train/eval streams from local text files: packing, masks, sharding, resume, determinism.

Tests of what both pipelines share run on both; the stream pipeline's own sharding, resume
and reshuffling are tested here, the cache pipeline's in test_data_cache.py."""

import ast
import collections
import json
import os

import numpy as np
import pytest

from data import packing
from data.config import default_data_config
from data.hf_tokenizer import save_for_transformers
from data.pipeline import make_eval_batches, make_train_iterator
from data.tokenizer import Tokenizer
from errors import UserError

EOS = 2
SEQ_LEN = 16


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _docs(n, seed=0):
    """Distinct documents of varied length, some longer than several windows."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "import", "os", "42"]
    return [
        f"doc{seed}_{i} " + " ".join(rng.choice(words, size=int(rng.integers(1, 40))))
        for i in range(n)
    ]


PIPELINES = ["stream", "cache"]


def _config(
    tmp_path,
    train_docs,
    eval_docs=None,
    file_format="lines",
    files=1,
    pipeline="stream",
    **overrides,
):
    """Writes documents into `files` files per split; returns a files-source config."""
    cfg = default_data_config()
    sep = {"lines": "\n", "paragraphs": "\n\n  \n"}[file_format]
    for split, docs in (("train", train_docs), ("eval", eval_docs or train_docs)):
        for f in range(files):
            (tmp_path / f"{split}{f}.txt").write_text(sep.join(docs[f::files]) + "\n")
    cfg.update(
        {
            "source": "files",
            "file_format": file_format,
            "train_files": str(tmp_path / "train*.txt"),
            "eval_files": str(tmp_path / "eval*.txt"),
            "seq_len": SEQ_LEN,
            "shuffle_buffer": 64,
            "pipeline": pipeline,
            "cache_dir": str(tmp_path / "cache"),
            **overrides,
        }
    )
    return cfg


def _expected_stream(tok, docs):
    return [t for d in docs if d.strip() for t in tok.encode(d) + [EOS]]


def _real_windows(batch):
    """Real tokens of each row's seq_len+1 window, with pack_documents=False weights."""
    windows = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
    real = np.concatenate([batch["segment_ids"][:, :1] > 0, batch["weights"] > 0], axis=1)
    return [row[mask] for row, mask in zip(windows, real)]


def _epoch(it):
    """The batches of the iterator's current epoch (reads one batch past it)."""
    start, batches = it.get_state()["epoch"], []
    while True:
        batch = next(it)
        if it.get_state()["epoch"] != start:
            return batches
        batches.append(batch)


def _counts(batches):
    return collections.Counter(t for b in batches for row in _real_windows(b) for t in row.tolist())


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("file_format", ["lines", "paragraphs"])
def test_packing_keeps_every_token_and_adds_only_eos(tmp_path, tok, file_format, pipeline):
    docs = (
        _docs(30) + ["", "   "] + [" ".join(["longdocument"] * 60)]
    )  # empty docs; one spans several windows
    cfg = _config(
        tmp_path, docs, file_format=file_format, files=2, pack_documents=False, pipeline=pipeline
    )
    stream = [
        t
        for b in make_eval_batches(cfg, global_batch_size=4)
        for row in _real_windows(b)
        for t in row
    ]
    expected = _expected_stream(tok, docs[0::2]) + _expected_stream(tok, docs[1::2])  # file by file
    assert len(tok.encode(docs[-1])) > 3 * (SEQ_LEN + 1)
    assert stream == expected


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_whole_file_documents(tmp_path, tok, pipeline):
    docs = ["first file\n\nwith blank lines\n", "", "third file"]
    for i, d in enumerate(docs):
        (tmp_path / f"f{i}.txt").write_text(d)
    cfg = default_data_config()
    cfg.update(
        source="files",
        file_format="document",
        train_files=str(tmp_path / "f*.txt"),
        eval_files=str(tmp_path / "f*.txt"),
        seq_len=8,
        pack_documents=False,
        pipeline=pipeline,
        cache_dir=str(tmp_path / "cache"),
    )
    stream = [
        t
        for b in make_eval_batches(cfg, global_batch_size=2)
        for row in _real_windows(b)
        for t in row
    ]
    assert stream == _expected_stream(tok, docs)


def assert_document_masks(b):
    """Segment ids, positions and weights of a pack_documents batch agree with its eos tokens."""
    inputs, seg, pos, w = b["inputs"], b["segment_ids"], b["positions"], b["weights"]
    real = seg > 0
    after_eos = np.concatenate([np.zeros_like(inputs[:, :1], bool), inputs[:, :-1] == EOS], axis=1)
    new_doc = after_eos.copy()
    new_doc[:, 0] = True
    expected_seg = np.cumsum(new_doc, axis=1)
    np.testing.assert_array_equal(seg, np.where(real, expected_seg, 0))
    np.testing.assert_array_equal(pos[new_doc & real], 0)
    inside = ~new_doc[:, 1:] & real[:, 1:]  # positions count up inside a document
    np.testing.assert_array_equal(pos[:, 1:][inside], (pos[:, :-1] + 1)[inside])
    # eos never predicts the next document's first token; every other real target counts.
    # target t is input t+1; only the last target's reality is not visible in the inputs.
    real_target = np.concatenate([real[:, 1:], w[:, -1:] > 0], axis=1)
    np.testing.assert_array_equal(w > 0, real_target & (inputs != EOS))
    assert b["targets"].dtype == np.int32 and w.dtype == np.float32


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_document_aware_segments_positions_and_weights(tmp_path, pipeline):
    cfg = _config(tmp_path, _docs(40), pipeline=pipeline)
    for b in make_eval_batches(cfg, global_batch_size=4):
        assert_document_masks(b)


def test_batch_features_at_document_boundaries():
    doc_ids = np.array([[5, 5, 5, 6, 6, 7, -1, -1, -1]])
    tokens = np.array([[10, 11, EOS, 12, EOS, 13, 0, 0, 0]])
    b = packing.batch_features(tokens, doc_ids, pack_documents=True)
    np.testing.assert_array_equal(b["inputs"], [[10, 11, EOS, 12, EOS, 13, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[11, EOS, 12, EOS, 13, 0, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["weights"], [[1, 1, 0, 1, 0, 0, 0, 0]])
    flat = packing.batch_features(tokens, doc_ids, pack_documents=False)
    np.testing.assert_array_equal(flat["segment_ids"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(flat["positions"], [[0, 1, 2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(flat["weights"], [[1, 1, 1, 1, 1, 0, 0, 0]])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pack_documents_false_gives_plain_positions(tmp_path, pipeline):
    cfg = _config(tmp_path, _docs(20), pack_documents=False, pipeline=pipeline)
    b = next(make_train_iterator(cfg, global_batch_size=2, seed=0))
    np.testing.assert_array_equal(b["segment_ids"], 1)
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(SEQ_LEN), (2, SEQ_LEN)))
    np.testing.assert_array_equal(b["weights"], 1.0)


@pytest.mark.parametrize("files", [4, 1])  # shard by file; by document when files < processes
def test_process_shards_are_disjoint_and_cover_one_epoch(tmp_path, tok, files):
    docs = _docs(41)
    cfg = _config(tmp_path, docs, files=files, pack_documents=False)
    shards = []
    for p in range(2):
        it = make_train_iterator(cfg, global_batch_size=4, seed=1, process_index=p, process_count=2)
        batches = _epoch(it)
        assert batches[0]["inputs"].shape == (2, SEQ_LEN)
        shards.append(_counts(batches))
    assert shards[0] and shards[1]
    assert shards[0] + shards[1] == collections.Counter(_expected_stream(tok, docs))
    if files == 4:  # process 0 reads files 0 and 2
        assert shards[0] == collections.Counter(_expected_stream(tok, docs[0::4] + docs[2::4]))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_continues_with_the_identical_next_batch(tmp_path):
    cfg = _config(tmp_path, _docs(30), files=3)
    it = make_train_iterator(cfg, global_batch_size=4, seed=3)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    later = _take(it, 40)  # runs past the end of epoch 0
    assert it.get_state()["epoch"] >= 1
    it.set_state(state)  # rewind the same iterator
    _assert_same(_take(it, 40), later)
    rebuilt = make_train_iterator(cfg, global_batch_size=4, seed=3)
    rebuilt.set_state(state)
    _assert_same(_take(rebuilt, 40), later)
    epoch1_state = it.get_state()
    ahead = _take(it, 3)
    rebuilt.set_state(epoch1_state)
    _assert_same(_take(rebuilt, 3), ahead)


def test_resume_with_another_batch_size_continues_at_the_same_window(tmp_path):
    cfg = _config(tmp_path, _docs(30), files=3)
    reference = np.concatenate(
        [b["inputs"] for b in _take(make_train_iterator(cfg, global_batch_size=2, seed=3), 9)]
    )
    it = make_train_iterator(cfg, global_batch_size=4, seed=3)
    _take(it, 3)  # windows 0..11
    bigger = make_train_iterator(cfg, global_batch_size=6, seed=3)
    bigger.set_state(it.get_state())
    np.testing.assert_array_equal(next(bigger)["inputs"], reference[12:18])


def test_state_from_another_setup_is_rejected(tmp_path):
    cfg = _config(tmp_path, _docs(10))
    state = make_train_iterator(cfg, global_batch_size=4, seed=3).get_state()
    other = make_train_iterator(cfg, global_batch_size=4, seed=4)
    with pytest.raises(UserError, match="seed"):
        other.set_state(state)


def test_same_seed_same_batches_other_seed_other_order_and_epochs_reshuffle(tmp_path, tok):
    cfg = _config(tmp_path, _docs(30), files=3)
    a = _epoch(make_train_iterator(cfg, global_batch_size=4, seed=7))
    _assert_same(a, _epoch(make_train_iterator(cfg, global_batch_size=4, seed=7)))
    it = make_train_iterator(cfg, global_batch_size=4, seed=8)
    b = _epoch(it)
    assert _counts(a) == _counts(b)  # same data ...
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, b))  # ... in another order
    b_next = _epoch(it)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(b, b_next))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_eval_is_finite_repeatable_padded_and_capped(tmp_path, pipeline):
    cfg = _config(tmp_path, _docs(8), _docs(9, seed=1), pipeline=pipeline)
    stream = make_eval_batches(cfg, global_batch_size=4)
    first, second = list(stream), list(stream)
    _assert_same(first, second)
    last = first[-1]
    assert last["inputs"].shape == (4, SEQ_LEN)
    assert (last["weights"].sum(axis=1) == 0).any()  # padding rows, not dropped
    assert last["segment_ids"][last["weights"].sum(axis=1) == 0].max() == 0
    cfg.eval_max_batches = 2
    assert len(list(make_eval_batches(cfg, global_batch_size=4))) == 2
    cfg.eval_max_batches = 0
    halves = [
        list(make_eval_batches(cfg, global_batch_size=4, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == len(first)
    for whole, h0, h1 in zip(first, *halves):
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([h0[k], h1[k]]))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_batches_feed_a_sharded_jax_array(tmp_path, pipeline):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    cfg = _config(tmp_path, _docs(20), pipeline=pipeline)
    batch = next(make_train_iterator(cfg, global_batch_size=8, seed=0))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    arrays = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    assert arrays["inputs"].shape == (8, SEQ_LEN) and arrays["inputs"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(arrays["weights"]), batch["weights"])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_tokenizer_json_gives_the_batches_of_its_sentencepiece_model(tmp_path, pipeline):
    """An imported model's tokenizer.json reads text through either pipeline: the bundled
    model converted to a tokenizer.json (the same ids; tools/export_hf.py's conversion)
    gives the same train and eval batches (the cache pipeline prepares a cache of each)."""
    converted = save_for_transformers("", str(tmp_path / "hf"), model_max_length=128)
    docs = _docs(30) + [" ".join(["longdocument"] * 60)]
    ours = _config(tmp_path, docs, pipeline=pipeline)
    theirs = _config(
        tmp_path, docs, pipeline=pipeline, tokenizer=converted.path, cache_dir=str(tmp_path / "c")
    )
    batches = [
        _take(make_train_iterator(cfg, global_batch_size=4, seed=0), 3)
        + list(make_eval_batches(cfg, global_batch_size=4))
        for cfg in (ours, theirs)
    ]
    _assert_same(*batches)


def test_no_module_of_the_data_package_imports_one_that_imports_it_back():
    """The data layer reads one way (sources -> tokenization -> cache -> stream/batches):
    every import between data/ modules, function-local ones too, forms no cycle."""
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    graph = {}
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".py"):
            with open(os.path.join(data_dir, name)) as f:
                tree = ast.parse(f.read())
            graph[f"data.{name[:-3]}"] = {
                target
                for node in ast.walk(tree)
                for target in _imported(node)
                if target.startswith("data.")
            }
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = " -> ".join([*path[path.index(module) :], module])
            raise AssertionError(f"import cycle: {cycle}")
        if module in done or module not in graph:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def _imported(node) -> list[str]:
    """The modules an import statement names (`from data import a` names data.a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return []
