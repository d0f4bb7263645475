"""data.source=sft: batches of whole fine-tuning examples, packed into rows.

The examples (data/sft.py) are tokenized once, when the run starts. An example
longer than a row (data.seq_len + 1 tokens) keeps its first seq_len + 1 tokens
and loses the rest; the number cut is logged. Each epoch visits the examples in
a seeded permutation (data/shuffle.py, as the token cache's windows) and packs
them greedily, in that order, into rows: an example that does not fit in what
is left of a row starts the next one, so no example is split between rows.
Rows become the batch format of data/batch.py as pre-training windows do
(data/packing.py: one segment per example, positions from 0 in each), and the
loss weights are further multiplied by the examples' masks: 1 only on response
tokens.

As with the token cache, global batch i is rows [iB, (i+1)B) of one endless
sequence of rows, a function of the seed and the files alone, and each process
reads its rows of it; the iterator's state is {"epoch", "row"} and a restore
continues exactly where the checkpoint was written.
"""

import numpy as np
from absl import logging

from data import packing, sft, shuffle
from errors import UserError

STATE_VERSION = 1
_PERMUTATION = 2  # hash domain (data/windows.py uses 0 and 1)


class Examples:
    """An SFT file's examples as token ids and response masks, each at most `row` tokens."""

    def __init__(self, path: str, cfg, tokenizer, row: int):
        examples, num_bad = sft.read_jsonl(path, cfg.skip_bad_lines)
        if num_bad:
            logging.warning("%s: skipped %d bad lines (data.skip_bad_lines).", path, num_bad)
        if not examples:
            raise UserError(f"{path}: no examples; give a JSONL file of SFT examples.")
        template = sft.load_template(cfg.sft_template, cfg.tokenizer)
        encoded = [sft.encode_example(tokenizer, example, template) for example in examples]
        truncated = sum(len(ids) > row for ids, _ in encoded)
        if truncated:
            logging.warning(
                "%s: %d of %d examples are longer than data.seq_len+1=%d tokens; each keeps its "
                "first %d tokens and loses the rest.",
                path,
                truncated,
                len(encoded),
                row,
                row,
            )
        self.path, self.truncated = path, truncated
        self.ids = [ids[:row] for ids, _ in encoded]
        self.masks = [mask[:row] for _, mask in encoded]
        self.lengths = np.array([len(ids) for ids in self.ids])

    def __len__(self) -> int:
        return len(self.ids)

    def pack(self, order: np.ndarray, row: int) -> list[list[int]]:
        """The examples of `order` packed greedily into rows of `row` tokens, in order."""
        rows, used = [[]], 0
        for example in order.tolist():
            if used + self.lengths[example] > row:
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += self.lengths[example]
        return rows

    def batch(self, rows: list[list[int]], row: int, num_rows: int, pack_documents: bool) -> dict:
        """Rows of examples (completed with padding rows to `num_rows`) -> a model batch."""
        tokens = np.zeros((len(rows), row), np.int32)
        doc_ids = np.full((len(rows), row), packing.PAD_DOC, np.int32)
        masks = np.zeros((len(rows), row), np.float32)
        for r, examples in enumerate(rows):
            start = 0
            for doc, example in enumerate(examples):
                end = start + self.lengths[example]
                tokens[r, start:end] = self.ids[example]
                masks[r, start:end] = self.masks[example]
                doc_ids[r, start:end] = doc
                start = end
        tokens, doc_ids = packing.pad_rows(tokens, doc_ids, num_rows)
        masks = np.pad(masks, ((0, num_rows - len(rows)), (0, 0)))
        batch = packing.batch_features(tokens, doc_ids, pack_documents)
        batch["weights"] *= masks[:, 1:]  # a target is learned only if it is a response token
        return batch


def _process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    rows = global_batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


class TrainIterator:
    """Endless train batches for one process: its rows of each global batch."""

    def __init__(
        self, examples: Examples, cfg, *, global_batch_size, seed, process_index, process_count
    ):
        self._examples, self._cfg, self._seed = examples, cfg, seed
        self._row = cfg.seq_len + 1
        self._global_batch_size = global_batch_size
        self._mine = _process_rows(global_batch_size, process_index, process_count)
        self._epoch, self._next_row = 0, 0
        self._layouts = {}

    def _layout(self, epoch: int) -> list[list[int]]:
        if epoch not in self._layouts:
            n = len(self._examples)
            key = shuffle.hash_ints(self._seed, _PERMUTATION, epoch)
            order = shuffle.permute(np.arange(n), n, key)
            self._layouts = {epoch: self._examples.pack(order, self._row)}  # one epoch kept
        return self._layouts[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self._global_batch_size:
            layout = self._layout(self._epoch)
            wanted = self._global_batch_size - len(rows)
            rows += layout[self._next_row : self._next_row + wanted]
            self._next_row += wanted
            if self._next_row >= len(layout):
                self._epoch, self._next_row = self._epoch + 1, 0
        mine = rows[self._mine]
        return self._examples.batch(mine, self._row, len(mine), self._cfg.pack_documents)

    def _identity(self) -> dict:
        e = self._examples
        return {
            "seed": self._seed,
            "seq_len": self._cfg.seq_len,
            "sft_template": self._cfg.sft_template,
            "examples": len(e),
            "tokens": int(e.lengths.sum()),
        }

    def get_state(self) -> dict:
        """JSON-serialisable position, the same on every process."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "row": self._next_row,
            **self._identity(),
        }

    def set_state(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, **self._identity()}
        mismatch = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatch:
            raise UserError(
                f"data iterator state does not match this SFT data (saved, current): {mismatch}. "
                "Resume with the same seed, data.sft_file, data.sft_template and tokenizer."
            )
        self._epoch, self._next_row = int(state["epoch"]), int(state["row"])


class EvalStream:
    """Finite eval batches, the examples in file order; every iter() yields the same."""

    def __init__(self, examples: Examples, cfg, *, global_batch_size, process_index, process_count):
        self._examples, self._cfg = examples, cfg
        self._row = cfg.seq_len + 1
        self._global_batch_size = global_batch_size
        self._mine = _process_rows(global_batch_size, process_index, process_count)
        self._rows = examples.pack(np.arange(len(examples)), self._row)

    def __iter__(self):
        size = self._global_batch_size
        batches = -(-len(self._rows) // size)
        if self._cfg.eval_max_batches:
            batches = min(batches, self._cfg.eval_max_batches)
        for start in range(0, batches * size, size):  # the last one padded, not dropped
            rows = self._rows[start : start + size][self._mine]
            yield self._examples.batch(
                rows, self._row, self._mine.stop - self._mine.start, self._cfg.pack_documents
            )
