"""data.mixture: sources blended by weight, exact resume, process-count independence, refusals,
and a training run that logs tokens and a validation loss per source."""

import json

import numpy as np
import pytest

from data import mixture, prepare
from data.config import default_data_config, validate
from data.pipeline import make_train_iterator
from data.tokenizer import Tokenizer
from errors import UserError
from tests.test_data_cache import _state, _windows
from tests.test_data_pipeline import SEQ_LEN, _assert_same, _config, _docs, _take
from tests.test_train_loop import read_metrics, small_config
from training import loop

WEIGHTS = {"a": 0.75, "b": 0.25}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two file sources, a (one file per split) and b (another), with distinct documents."""
    root = tmp_path_factory.mktemp("mixture")
    for name, seed in (("a", 1), ("b", 2)):
        (root / name).mkdir()
        _config(root / name, _docs(20, seed=seed))
    return root


def _mixture_config(root, mix="a:3,b:1", **overrides):
    """The sources' caches are <root>/cache/a and b; the run's own data.source is unused."""
    cfg = default_data_config()
    sources = "; ".join(
        f"{n}: source=files train_files={root / n}/train*.txt eval_files={root / n}/eval*.txt"
        for n in ("a", "b")
    )
    cfg.update(seq_len=SEQ_LEN, file_format="lines", cache_dir=str(root / "cache"))
    cfg.update(mixture=mix, mixture_sources=sources, **overrides)
    return cfg


def _source_windows(cfg) -> dict[tuple, str]:
    """Every train window of every source (tokens as a tuple) -> the source's name."""
    owner = {}
    for name, source_cfg in mixture.source_configs(cfg).items():
        split = prepare.open_split(source_cfg, Tokenizer(), "train")
        count, length = split.num_windows(SEQ_LEN + 1), SEQ_LEN + 1
        tokens, _ = split.read(np.arange(count) * length, length)
        for window in map(tuple, tokens.tolist()):
            assert owner.setdefault(window, name) == name  # no window in both sources
    return owner


def test_each_source_gives_its_weight_of_the_windows_and_tokens(root):
    cfg = _mixture_config(root)
    it = make_train_iterator(cfg, global_batch_size=16, seed=0)
    owner = _source_windows(cfg)
    windows = _windows(_take(it, 250))
    rows = [owner[w] for w in windows]  # every row is a window of one source
    n = len(rows)
    for name, weight in WEIGHTS.items():
        count = rows.count(name)
        # Rows are independent draws: Binomial(n, weight); 4 sigma is exceeded once in ~16k.
        assert abs(count - n * weight) < 4 * np.sqrt(n * weight * (1 - weight)), (name, count)
        assert it.source_tokens()[f"tokens_{name}"] == count * SEQ_LEN  # what the loop logs
        # Each source reads its own epochs: its first windows are all of its windows once.
        mine = [w for w in windows if owner[w] == name]
        epoch = list(owner.values()).count(name)
        assert len(set(mine[:epoch])) == epoch < len(mine)


def _fresh(cfg, seed=0, **kwargs):
    return make_train_iterator(cfg, global_batch_size=16, seed=seed, **kwargs)


def test_batches_resume_exactly_and_do_not_depend_on_the_process_count(root):
    cfg = _mixture_config(root, pack_documents=True)
    whole = _fresh(cfg)
    halves = [_fresh(cfg, process_index=p, process_count=2) for p in range(2)]
    for _ in range(12):
        rows = [next(h) for h in halves]
        joined = {k: np.concatenate([rows[0][k], rows[1][k]]) for k in rows[0]}
        _assert_same([next(whole)], [joined])
        assert _state(whole) == _state(halves[0]) == _state(halves[1])
    # Restored from the state a checkpoint holds (what train.py does after a SIGKILL), on one
    # process or two, it continues with the same batches.
    state, ahead = _state(whole), _take(whole, 5)
    resumed = _fresh(cfg)
    resumed.set_state(json.loads(json.dumps(state)))
    _assert_same(_take(resumed, 5), ahead)
    assert resumed.source_tokens() == whole.source_tokens()
    two = [_fresh(cfg, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        it.set_state(state)
    rows = [next(it) for it in two]
    _assert_same([{k: np.concatenate([rows[0][k], rows[1][k]]) for k in rows[0]}], ahead[:1])
    with pytest.raises(UserError, match="does not match this pipeline.*seed"):
        _fresh(cfg, seed=1).set_state(state)
    _fresh(_mixture_config(root, "a:1,b:1")).set_state(state)  # new weights: accepted


@pytest.mark.parametrize(
    "mix, sources, message",
    [
        ("a:0,b:1", None, "'a:0': a weight must be a positive number"),
        ("a:1,b:-2", None, "'b:-2': a weight must be a positive number"),
        ("a:1,b:1,web:1", None, "source 'web' is not defined"),
        ("a:1", None, "defines b, which data.mixture gives no weight"),
        ("a:1,b:1", "b: source=s3", r"b: source='s3'; a mixed source is one of stdlib, files"),
        ("a:1,b:1", "b: source=sft", r"b: source='sft'; a mixed source is one of"),
        ("a:1,b:1", "b: source=files train_files=/no/such/*.txt", "source 'b'.*matches no file"),
        ("a:1,b:1", "b: tokenizer=x.model", "b: give field=value pairs with fields of source"),
    ],
)
def test_bad_mixtures_are_refused_with_one_message(root, mix, sources, message):
    cfg = _mixture_config(root, mix)
    if sources:
        cfg.mixture_sources = cfg.mixture_sources.split(";")[0] + ";" + sources
    with pytest.raises(UserError, match=message) as error:
        mixture.source_configs(validate(cfg))
    assert "\n" not in str(error.value)


def test_the_stream_pipeline_refuses_a_mixture(root):
    with pytest.raises(UserError, match="data.mixture needs data.pipeline=cache"):
        mixture.source_configs(validate(_mixture_config(root, pipeline="stream")))


def test_training_on_a_mixture_logs_tokens_and_eval_loss_per_source(root, tmp_path):
    config = small_config(
        **{"train.num_steps": 2, "train.eval_every": 2, "checkpoint.every_steps": 0}
    )
    code = root / "a"
    config.data.mixture = "stdlib:0.5,code:0.5"  # stdlib: the run's own data.* source
    config.data.mixture_sources = (
        f"code: source=files train_files={code}/train*.txt eval_files={code}/eval*.txt "
        f"file_format=lines cache_dir={root / 'cache' / 'a'}"  # the fixture's cache of a
    )
    loop.train(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    tokens = [records[2][f"tokens_{n}"] for n in ("stdlib", "code")]
    assert sum(tokens) == 2 * 8 * 32 and min(tokens) > 0  # steps * batch * seq_len, cumulative
    assert records[1]["tokens_stdlib"] + records[1]["tokens_code"] == 8 * 32
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    losses = [evals[0][f"eval_loss_{n}"] for n in ("stdlib", "code")]
    assert all(np.isfinite(losses)) and min(losses) <= evals[0]["eval_loss"] <= max(losses)
