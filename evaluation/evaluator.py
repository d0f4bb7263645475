"""A model's params on a mesh that scores batches and generates text.

eval.py, the evaluation tasks inside training and the lm-eval adapter all evaluate
through this one object, over model/sampler.py's Sampler (params placed by their
logical axis names, jitted generation) and training/step.py's eval step (the
forward pass and loss sums that training evaluates with).
"""

import jax
import numpy as np

from evaluation.metrics import loss_metrics, target_bytes
from model.sampler import SamplingConfig
from sharding import batch_sharding
from training.step import make_eval_step


def score_batches(eval_step, to_global, params, batches, tokenizer) -> dict:
    """Loss, perplexity and bits per byte over finite `batches` (data/batch.py format), and
    for a masked LM the accuracy over its masked tokens (the weighted targets).
    Each row's target bytes go through `to_global` beside the row, so the bytes are summed
    over the same global rows as the loss, whether a process feeds only its own rows
    (training's evaluation) or the whole batch (Evaluator).

    A batch's sums are read after the next batch is dispatched, so the host prepares and
    places batch n+1 while the devices score batch n (as the train loop does)."""
    totals = {"ce_sum": 0.0, "weight_sum": 0.0, "bytes": 0}
    pending = None
    for batch in batches:
        placed = to_global({**batch, "bytes": _bytes_by_row(tokenizer, batch)})
        row_bytes = placed.pop("bytes")
        sums = eval_step(params, placed, row_bytes)
        if pending is not None:
            _add(totals, pending)
        pending = sums
    if pending is not None:
        _add(totals, pending)
    return loss_metrics(
        totals["ce_sum"], totals["weight_sum"], totals["bytes"], totals.get("correct_sum")
    )


def _add(totals: dict, sums: dict) -> None:
    """Adds one batch's sums (device arrays; "correct_sum": a masked LM's hits,
    training/step.py make_eval_step) into the host totals."""
    for name, value in jax.device_get(sums).items():
        totals[name] = totals.get(name, 0) + value.item()


def _bytes_by_row(tokenizer, batch: dict) -> np.ndarray:
    """Each row's target bytes in its first column (zeros elsewhere): shaped like the
    batch's fields, so it is placed as they are."""
    counts = np.zeros(batch["targets"].shape, np.int32)
    counts[:, 0] = target_bytes(tokenizer, batch["targets"], batch["weights"])
    return counts


class Evaluator:
    """Scores batches and generates with a Sampler's model, mesh and (default) params."""

    def __init__(self, sampler, tokenizer, batch_size: int):
        self.sampler, self.tokenizer, self.batch_size = sampler, tokenizer, batch_size
        shardings = jax.tree.map(lambda a: a.sharding, sampler.abstract_params)
        self._eval_step = make_eval_step(sampler.model, sampler.mesh, sampler.rules, shardings)
        self._sharding = batch_sharding(sampler.mesh, sampler.rules)

    def _to_global(self, batch: dict) -> dict:
        """Rows padded with weight-0 rows to a multiple of the data-parallel size. Every
        process holds the whole batch (evaluation data is read alike on all of them), so
        the global shape is the batch's own and each process places the rows it owns."""
        missing = -batch["inputs"].shape[0] % self.sampler.batch_multiple
        padded = {name: np.pad(value, ((0, missing), (0, 0))) for name, value in batch.items()}
        shapes = {name: value.shape for name, value in padded.items()}
        return jax.make_array_from_process_local_data(self._sharding, padded, shapes)

    def score(self, batches, params=None) -> dict:
        params = self.sampler.params if params is None else params
        return score_batches(self._eval_step, self._to_global, params, batches, self.tokenizer)

    def generate(self, prompts: list, sampling: SamplingConfig, params=None) -> list[str]:
        """Each prompt's continuation as text (up to eos or max_new_tokens); a prompt too
        long for the model keeps its last tokens. A prompt is text (encoded here) or token
        ids, given as they are: SFT evaluation passes the exact ids training scores."""
        eos = self.tokenizer.eos_id
        encode = self.tokenizer.encode
        ids = [encode(p) if isinstance(p, str) else list(map(int, p)) for p in prompts]
        ids = self.sampler.check_room(ids, sampling.max_new_tokens, truncate=True)
        texts = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            new_tokens = self.sampler.generate(
                chunk,
                sampling,
                eos,
                params=params,
                num_ids=self.tokenizer.vocab_size,
                start_id=self.tokenizer.bos_id,
            )
            for new in new_tokens:
                texts.append(self.tokenizer.decode([t for t in new if t != eos]))
        return texts
