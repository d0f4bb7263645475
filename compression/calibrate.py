"""Calibration statistics: what each kernel's inputs look like on a few batches of text.

Wanda weighs each weight by the norm of its input feature, and activation-whitened
SVD needs the inputs' Gram matrix X^T X. Every Dense adds both to a mutable
collection while it runs (model/layers.py), so one forward pass per batch collects
them for all layers at once, stacked over the layer axis like the kernels:

    {"layers": {"attn": {"query": {"sum_squares": [layers, *in]}, ...}, "mlp": {...}}}

with "gram" [layers, in_size, in_size] instead when `gram=True`. Every position
counts, padding included: the statistics are sums, and a few padded positions
barely move them.
"""

import jax
import jax.numpy as jnp

from errors import UserError
from model.config import ModelConfig
from model.transformer import Transformer


def input_statistics(model_config: ModelConfig, params, batches, gram: bool = False) -> dict:
    """Summed squared inputs (or Gram matrices) of every layers' kernel over `batches`
    (dicts with inputs, segment_ids and positions, data/batch.py)."""
    model = Transformer(model_config)
    collection = "calibration_gram" if gram else "calibration"

    @jax.jit
    def statistics(params, batch):
        _, stats = model.apply(
            {"params": params},
            batch["inputs"],
            batch["segment_ids"],
            batch["positions"],
            mutable=[collection],
        )
        return stats[collection]

    totals = None
    for batch in batches:
        stats = statistics(params, {k: batch[k] for k in ("inputs", "segment_ids", "positions")})
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    if totals is None:
        raise UserError("the calibration data gave no batches; give more text.")
    return totals
