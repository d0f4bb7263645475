"""data.mixture: several sources blended by weight into the cache pipeline's batches.

    --config.data.mixture='stdlib:0.7,code:0.3'
    --config.data.mixture_sources='code: source=files train_files=code/*.py eval_files=val/*.py'

Each source is a data config of its own (`source_configs`): the run's data.*
fields with the source's kind and settings from data.mixture_sources (a name
that is stdlib, files or tfds and has no definition reads the run's fields), and
its own token cache (<data.cache_dir>/<name> when data.cache_dir is set). The
tokenizer, seq_len, sampling and packing are the run's.

Blending is per window, like data.windows' endless sequence: window g of the run
(row g mod B of global batch g // B) comes from source s(g), drawn by a seeded
hash of g against the normalised cumulative weights, so P(s(g) = i) = w_i and
draws are independent. Every window is seq_len + 1 tokens, so the row share and
the token share of a source are both w_i in expectation. Source i reads its own
endless window sequence (data.windows: each epoch a permutation of its windows,
keyed by the seed and the source's name) at position n_i, the number of windows
it gave before. The iterator state is g and the n_i: a resume continues exactly,
the global batches do not depend on the process count (each process draws the
sources of every row and reads only its own rows), and a resume may change the
weights or add sources: each source continues where it was.
"""

import math
import os
import re
import zlib

import numpy as np

from data import packing, shuffle
from data.config import MIXTURE_FIELDS, DataConfig
from data.windows import EvalStream as SourceEvalStream
from data.windows import process_rows, window_starts
from errors import UserError

KINDS = ("stdlib", "files", "tfds")  # sft packs whole examples, not windows: not mixed
STATE_VERSION = 1
_DRAW, _SOURCE = 2, 3  # hash domains (data.windows uses 0 and 1)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # names become metric names: tokens_<name>


def weights(cfg) -> dict[str, float]:
    """data.mixture as {name: weight}, in its order; weights as given (not normalised)."""
    out = {}
    for entry in (e.strip() for e in cfg.mixture.split(",")):
        name, colon, text = (part.strip() for part in entry.partition(":"))
        if not colon or not _NAME.fullmatch(name):
            raise UserError(
                f"data.mixture: {entry!r} is not NAME:WEIGHT (e.g. 'stdlib:0.7,code:0.3'; "
                "names are letters, digits and _)."
            )
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not (weight > 0 and math.isfinite(weight)):
            raise UserError(
                f"data.mixture: {entry!r}: a weight must be a positive number (they are "
                "normalised to sum to 1); leave a source out instead of weighting it 0."
            )
        if name in out:
            raise UserError(f"data.mixture: {name!r} is named twice; name each source once.")
        out[name] = weight
    return out


def definitions(cfg) -> dict[str, dict]:
    """data.mixture_sources as {name: {field: value}}."""
    out = {}
    for part in filter(None, (p.strip() for p in cfg.mixture_sources.split(";"))):
        name, colon, assignments = (p.strip() for p in part.partition(":"))
        if not colon or not _NAME.fullmatch(name) or name in out:
            raise UserError(
                f"data.mixture_sources: {part!r} is not 'NAME: field=value ...' with a new "
                "name (definitions are ';'-separated)."
            )
        fields = dict(assignment.partition("=")[::2] for assignment in assignments.split())
        unknown = [key for key in fields if key not in MIXTURE_FIELDS]
        if unknown or "" in fields.values():
            raise UserError(
                f"data.mixture_sources: {name}: give field=value pairs with fields of "
                f"{', '.join(MIXTURE_FIELDS)} (unknown or empty: {unknown or assignments!r})."
            )
        out[name] = fields
    return out


def source_configs(cfg) -> dict[str, DataConfig]:
    """Each source of data.mixture as a checked data config of its own, in data.mixture's
    order: the run's fields, with the source's kind, settings and cache directory."""
    if cfg.source == "sft" or cfg.pipeline != "cache":
        raise UserError(
            "data.mixture needs data.pipeline=cache and a source other than sft (the stream "
            "pipeline's state is per process, and fine-tuning packs whole examples)."
        )
    mix, defined = weights(cfg), definitions(cfg)
    unweighted = [name for name in defined if name not in mix]
    if unweighted:
        raise UserError(
            f"data.mixture_sources defines {', '.join(unweighted)}, which data.mixture gives no "
            "weight; add NAME:WEIGHT to data.mixture, or remove the definition."
        )
    run = {name: getattr(cfg, name) for name in DataConfig.__dataclass_fields__}
    configs = {}
    for name in mix:
        if name not in defined and name not in KINDS:
            raise UserError(
                f"data.mixture: source {name!r} is not defined; add '{name}: source=files "
                "train_files=... eval_files=...' (or tfds, stdlib) to data.mixture_sources, or "
                f"use a built-in name ({', '.join(KINDS)}) that reads the run's data.* fields."
            )
        fields = defined.get(name, {})
        kind = fields.get("source", name if name in KINDS else "")
        if kind not in KINDS:
            raise UserError(
                f"data.mixture_sources: {name}: source={kind!r}; a mixed source is one of "
                f"{', '.join(KINDS)} (sft examples are not cut into windows)."
            )
        cache_dir = fields.get("cache_dir") or (
            os.path.join(cfg.cache_dir, name) if cfg.cache_dir else ""
        )
        values = {**run, **fields, "source": kind, "cache_dir": cache_dir}
        try:
            configs[name] = DataConfig(**{**values, "mixture": "", "mixture_sources": ""})
        except UserError as error:
            raise UserError(f"data.mixture source {name!r}: {error}") from None
    return configs


def draw_sources(seed: int, cumulative: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The source (index) of each window of the run: a uniform draw in [0, 1) hashed from
    (seed, window), placed among the normalised cumulative weights."""
    uniform = (shuffle.hash_ints(seed, _DRAW, windows) >> np.uint64(11)) * 2.0**-53
    return np.searchsorted(cumulative, uniform, side="right")


class TrainIterator:
    """Endless train batches for one process: its rows of each blended global batch."""

    def __init__(
        self,
        splits: dict,
        mixture_weights: dict[str, float],
        cfg,
        tokenizer_sha256: str,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        self._names, self._splits = list(splits), list(splits.values())
        self._weights = {name: mixture_weights[name] for name in self._names}
        self._cumulative = np.cumsum(list(self._weights.values())) / sum(self._weights.values())
        self._cumulative[-1] = 1.0  # the draw is < 1: always some source, whatever the rounding
        self._source_seeds = [
            int(shuffle.hash_ints(seed, _SOURCE, zlib.crc32(name.encode())))
            for name in self._names
        ]
        self._cfg, self._tokenizer_sha256, self._seed = cfg, tokenizer_sha256, seed
        self._global_batch_size = global_batch_size
        self._rows = process_rows(global_batch_size, process_index, process_count)
        self._length = cfg.seq_len + 1
        self.invalid_utf8_documents = sum(s.invalid_utf8_documents for s in self._splits)
        self._next = 0  # the next window of the run
        self._taken = np.zeros(len(self._names), np.int64)  # windows each source gave so far

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        sources = draw_sources(
            self._seed, self._cumulative, self._next + np.arange(self._global_batch_size)
        )
        positions = np.empty_like(sources)  # each row's window in its source's sequence
        for s in range(len(self._names)):
            here = sources == s
            positions[here] = self._taken[s] + np.arange(np.count_nonzero(here))
        mine, at = sources[self._rows], positions[self._rows]
        tokens = np.empty((len(mine), self._length), np.int32)
        doc_ids = np.empty((len(mine), self._length), np.int64)
        for s in np.unique(mine).tolist():
            here = mine == s
            split, sampling = self._splits[s], self._cfg.sampling
            starts = window_starts(split, self._length, sampling, self._source_seeds[s], at[here])
            tokens[here], doc_ids[here] = split.read(starts, self._length)
        self._taken += np.bincount(sources, minlength=len(self._names))
        self._next += self._global_batch_size
        return packing.batch_features(tokens, doc_ids, self._cfg.pack_documents)

    def source_tokens(self) -> dict[str, int]:
        """Cumulative tokens (seq_len per window, all processes) each source gave: tokens_<name>."""
        seq_len = self._cfg.seq_len
        return {f"tokens_{n}": int(t) * seq_len for n, t in zip(self._names, self._taken)}

    def _identity(self) -> dict:
        return {
            "seed": self._seed,
            "seq_len": self._cfg.seq_len,
            "sampling": self._cfg.sampling,
            "tokenizer_sha256": self._tokenizer_sha256,
        }

    def get_state(self) -> dict:
        """JSON-serialisable position, the same on every process: next() after
        set_state(state) gives the same batch."""
        return {
            "version": STATE_VERSION,
            "mixture_window": self._next,
            "taken": dict(zip(self._names, self._taken.tolist())),
            "train_tokens": {n: s.num_tokens for n, s in zip(self._names, self._splits)},
            "weights": self._weights,  # for the record: a resume may change them
            **self._identity(),
        }

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, **self._identity()}
        mismatch = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        saved_tokens = state.get("train_tokens", {})
        for name, split in zip(self._names, self._splits):
            if saved_tokens.get(name, split.num_tokens) != split.num_tokens:
                mismatch[f"train_tokens of {name}"] = (saved_tokens[name], split.num_tokens)
        if mismatch:
            raise UserError(
                f"data iterator state does not match this pipeline (saved, current): {mismatch}. "
                "Resume with the same seed and data config (data.mixture may change weights "
                "and add sources, not change a source's data)."
            )
        taken = state["taken"]
        self._next = int(state["mixture_window"])
        self._taken = np.array([int(taken.get(n, 0)) for n in self._names], np.int64)


class EvalStream:
    """Every source's eval batches in turn (data.eval_max_batches each); `sources` holds
    them by name, for a validation loss per source."""

    def __init__(self, sources: dict[str, SourceEvalStream]):
        self.sources = sources
        self.invalid_utf8_documents = sum(s.invalid_utf8_documents for s in sources.values())

    def __iter__(self):
        for stream in self.sources.values():
            yield from stream
