"""data.pipeline=cache: batches of windows read by index from a token cache.

The train split's tokens (data.token_cache) are cut into M windows of
seq_len + 1 tokens, back to back (the same windows the stream pipeline packs).
The run reads one endless sequence of windows, numbered g = 0, 1, 2, ...;
global batch i is windows [i*B, (i+1)*B) of it, and process p of P reads only
its rows of that batch, [p*B/P, (p+1)*B/P). With `data.sampling`:

  * permutation: window g is window permute(g mod M, M, key(seed, epoch g // M))
    of the corpus (data.shuffle), so each epoch visits every window once in its own
    seeded order: a global shuffle;
  * random_offsets: window g starts at a token offset drawn from hash(seed, g).

Either way global batch i is a function of (seed, i) and the corpus alone, the
same on any number of processes, and costs the same to compute anywhere in an
epoch: batches never wait at an epoch boundary, and the iterator's state is
two integers, {"epoch", "window"} (windows of the epoch read by all processes).
A restore sets them; a resume with another batch size or process count
continues at the same window. Batches are computed on the calling thread, in
about a millisecond (BENCHMARKS.md), while the device runs the previous step.
"""

import numpy as np

from data import packing, shuffle
from data.config import split_field
from data.token_cache import TokenSplit
from errors import UserError

STATE_VERSION = 3
_PERMUTATION, _OFFSETS = 0, 1  # hash domains


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    rows = global_batch_size // process_count
    return np.arange(process_index * rows, (process_index + 1) * rows)


def window_starts(
    split: TokenSplit, length: int, sampling: str, seed: int, windows: np.ndarray
) -> np.ndarray:
    """Token offsets at which windows `windows` of the endless sequence begin (data.mixture
    reads each source's sequence with it too)."""
    if sampling == "random_offsets":
        choices = max(1, split.num_tokens - length + 1)
        return (shuffle.hash_ints(seed, _OFFSETS, windows) % np.uint64(choices)).astype(np.int64)
    num_windows = split.num_windows(length)
    epochs, positions = np.divmod(windows, num_windows)
    chosen = np.empty_like(windows)
    for epoch in np.unique(epochs).tolist():  # one, or two across an epoch boundary
        here = epochs == epoch
        key = shuffle.hash_ints(seed, _PERMUTATION, epoch)
        chosen[here] = shuffle.permute(positions[here], num_windows, key)
    return chosen * length


class TrainIterator:
    """Endless train batches for one process: its rows of each global batch."""

    def __init__(
        self,
        split: TokenSplit,
        cfg,
        tokenizer_sha256: str,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        self._split, self._cfg, self._tokenizer_sha256 = split, cfg, tokenizer_sha256
        self._seed, self._global_batch_size = seed, global_batch_size
        self._rows = process_rows(global_batch_size, process_index, process_count)
        self.invalid_utf8_documents = split.invalid_utf8_documents
        self._length = cfg.seq_len + 1
        self._num_windows = split.num_windows(self._length)
        self._next = 0  # the next window of the endless sequence
        if self._num_windows < self._global_batch_size:
            raise UserError(
                f"{split_field(cfg, 'train')}: the train split ({split.num_tokens} tokens "
                f"in {split.path}) makes {self._num_windows} windows of data.seq_len+1="
                f"{self._length} tokens, fewer than one batch of {self._global_batch_size}; add "
                "text, or lower train.global_batch_size or data.seq_len."
            )

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        windows = self._next + self._rows
        starts = window_starts(self._split, self._length, self._cfg.sampling, self._seed, windows)
        self._next += self._global_batch_size
        tokens, doc_ids = self._split.read(starts, self._length)
        return packing.batch_features(tokens, doc_ids, self._cfg.pack_documents)

    def _identity(self) -> dict:
        c = self._cfg
        return {
            "seed": self._seed,
            "seq_len": c.seq_len,
            "sampling": c.sampling,
            "train_tokens": self._split.num_tokens,
            "tokenizer_sha256": self._tokenizer_sha256,
        }

    def get_state(self) -> dict:
        """JSON-serialisable position, the same on every process: next() after
        set_state(state) gives the same batch."""
        epoch, window = divmod(self._next, self._num_windows)
        return {"version": STATE_VERSION, "epoch": epoch, "window": window, **self._identity()}

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, **self._identity()}
        mismatch = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatch:
            raise UserError(
                f"data iterator state does not match this pipeline (saved, current): {mismatch}. "
                "Resume with the same seed and data config (and data.pipeline)."
            )
        self._next = int(state["epoch"]) * self._num_windows + int(state["window"])


class EvalStream:
    """Finite eval batches, the eval split's windows in order; every iter() yields the same."""

    def __init__(self, split: TokenSplit, cfg, *, global_batch_size, process_index, process_count):
        self._split, self._cfg = split, cfg
        self._global_batch_size = global_batch_size
        self._rows = process_rows(global_batch_size, process_index, process_count)
        self._length = cfg.seq_len + 1
        self.invalid_utf8_documents = split.invalid_utf8_documents

    def __iter__(self):
        batches = -(-self._split.num_windows(self._length) // self._global_batch_size)
        if self._cfg.eval_max_batches:
            batches = min(batches, self._cfg.eval_max_batches)
        for batch in range(batches):  # the last one ends in all-padding windows, not dropped
            windows = batch * self._global_batch_size + self._rows
            tokens, doc_ids = self._split.read(windows * self._length, self._length)
            yield packing.batch_features(tokens, doc_ids, self._cfg.pack_documents)
