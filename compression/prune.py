"""Pruning: zero the least important weights of every layers' kernel, magnitude or Wanda.

Each kernel W [layers, *in, *out] is pruned one layer at a time, seen as a matrix
[in_size, out_size] (input axes flattened row-major, likewise the output axes: attn out
[heads, head_dim, embed] has in_size heads x head_dim; query [embed, heads, head_dim] has
heads x head_dim output channels). A weight's score is

- "magnitude": |W_ij|;
- "wanda" (Sun et al. 2023): |W_ij| x ||X_i||, the norm of input feature i over the
  calibration tokens, sqrt of `compression.calibrate.input_statistics` sum_squares.

and the lowest scores are zeroed, by rank (ties broken by position), so the count is exact:

- `sparsity` s: floor(s x count) weights of each group, the group being the layer's whole
  matrix for magnitude and each output channel (its in_size inputs) for Wanda, as in the
  Wanda paper;
- `n_m` (N, M): in every run of M consecutive inputs of each output channel, the N highest
  scores stay (2:4 is the pattern of sparse tensor cores). XLA has no sparse matmul, so the
  zeros are stored dense: N:M is an accuracy study and an export format here, not a speed-up.

Embeddings only with `include_embeddings`, by magnitude: token_embed [vocab, embed] (with
tied embeddings also the output head, the same matrix) per output channel of the head
(vocab rows, groups along embed), and an untied lm_head [embed, vocab] like a kernel.
Norms, biases and pos_embed are never pruned. Runs on the host in numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from compression.denses import denses, map_denses
from errors import UserError
from model.config import ModelConfig
from model.layers import target_name
from model.lora import TARGETS

METHODS = ("magnitude", "wanda")


def prune(
    params,
    model_config: ModelConfig,
    *,
    method,
    sparsity=None,
    n_m=None,
    stats=None,
    include_embeddings=False,
):
    """(params with the pruned weights zeroed, report).

    `params`: a model's plain (unboxed) params. `stats`: for "wanda",
    `compression.calibrate.input_statistics(model_config, params, batches)`. The report
    maps each pruned tensor's path ("layers/attn/query/kernel") to its achieved sparsity
    (fraction of zeros), plus "total" (zeros / weights of all pruned tensors) and
    "total_of_all_params" (their zeros / every parameter of the model).
    """
    check(params, model_config, method, sparsity, n_m, stats, include_embeddings)
    prune_one = lambda w, num_in, sums: _prune_kernel(w, num_in, sums, method, sparsity, n_m)
    pruned = {}

    def change(module, name, leaves):
        sums = stats["layers"][module][name]["sum_squares"] if method == "wanda" else None
        kernel = prune_one(leaves["kernel"], TARGETS[target_name(name)][1], sums)
        pruned[f"layers/{module}/{name}/kernel"] = kernel
        return dict(leaves, kernel=kernel)

    new_params = map_denses(params, change)
    if include_embeddings:
        # token_embed [vocab, embed] is the head transposed: pruned as the kernel [embed, vocab].
        new_params["token_embed"] = prune_one(params["token_embed"].T[None], 1, None)[0].T
        pruned["token_embed"] = new_params["token_embed"]
        if "lm_head" in params:
            new_params["lm_head"] = prune_one(params["lm_head"][None], 1, None)[0]
            pruned["lm_head"] = new_params["lm_head"]
    zeros = {path: int(np.sum(np.asarray(w) == 0)) for path, w in pruned.items()}
    report = {path: zeros[path] / w.size for path, w in pruned.items()}
    report["total"] = sum(zeros.values()) / sum(w.size for w in pruned.values())
    report["total_of_all_params"] = sum(zeros.values()) / sum(
        w.size for w in jax.tree.leaves(new_params)
    )
    return new_params, report


def check(params, model_config, method, sparsity, n_m, stats, include_embeddings) -> None:
    """UserError, naming the flag, for a request that cannot be carried out."""
    if method not in METHODS:
        raise UserError(f"--prune={method!r}: give one of {', '.join(METHODS)}.")
    if (sparsity is None) == (n_m is None):
        raise UserError("--prune: give exactly one of --sparsity and --n_m.")
    if model_config.quantization != "none" or model_config.low_rank_ratio:
        raise UserError(
            f"--prune: the run is quantized (model.quantization={model_config.quantization!r}) "
            f"or factorized (model.low_rank_ratio={model_config.low_rank_ratio}); prune the "
            "dense run first, then quantize."
        )
    if sparsity is not None and not 0 < sparsity < 1:
        raise UserError(f"--sparsity={sparsity}: give the fraction of weights to zero, in (0, 1).")
    if n_m is not None:
        n, m = n_m
        if not 1 <= n < m:
            raise UserError(f"--n_m={n}:{m}: give N:M with 1 <= N < M, e.g. 2:4.")
        inputs = {
            f"layers/{module}/{name}/kernel": _in_size(leaves["kernel"], name)
            for module, name, leaves in denses(params)
        }
        if include_embeddings:  # the output head's input is the embedding
            heads = [k for k in ("token_embed", "lm_head") if k in params]
            inputs.update(dict.fromkeys(heads, model_config.embed_dim))
        for path, size in inputs.items():
            if size % m:
                raise UserError(
                    f"--n_m={n}:{m}: M={m} does not divide {path}'s input size {size}; "
                    "give an M that divides every pruned kernel's input size."
                )
    if method == "wanda" and stats is None:
        raise UserError("--prune=wanda needs calibration data (its inputs' squared norms).")
    if method == "wanda" and include_embeddings:
        raise UserError(
            "--prune=wanda has no calibration for the embeddings; prune them with "
            "--prune=magnitude, or leave them out."
        )


def _in_size(kernel, name: str) -> int:
    return math.prod(kernel.shape[1 : 1 + TARGETS[target_name(name)][1]])


def _prune_kernel(kernel, num_in: int, sum_squares, method, sparsity, n_m):
    """`kernel` [layers, *in, *out] with each layer's lowest-scoring weights zeroed."""
    layers, *dims = kernel.shape
    in_size = math.prod(dims[:num_in])
    w = np.asarray(kernel)
    # [layers, out, in]: an output channel's inputs are contiguous, as N:M groups need.
    scores = np.abs(w.astype(np.float32)).reshape(layers, in_size, -1).transpose(0, 2, 1)
    if sum_squares is not None:
        norms = np.sqrt(np.asarray(sum_squares, np.float32).reshape(layers, 1, in_size))
        scores = scores * norms
    keep = np.stack([_keep(scores[i], method, sparsity, n_m) for i in range(layers)])
    keep = keep.transpose(0, 2, 1).reshape(w.shape)
    return jnp.asarray(np.where(keep, w, np.zeros_like(w)))


def _keep(scores, method, sparsity, n_m):
    """One layer's mask [out, in]: False where a weight is pruned."""
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(*scores.shape[:-1], -1, m)  # [out, in / M, M]
        return _drop_lowest(groups, m - n).reshape(scores.shape)
    groups = scores if method == "wanda" else scores.reshape(1, -1)  # per output / whole matrix
    # floor(s x count); the epsilon keeps a product such as 0.29 x 100 = 28.999... at 29.
    count = math.floor(sparsity * groups.shape[-1] + 1e-9)
    return _drop_lowest(groups, count).reshape(scores.shape)


def _drop_lowest(scores, count: int):
    """A mask, False at exactly the `count` lowest scores of every row (last axis)."""
    order = np.argsort(scores, axis=-1, kind="stable")
    keep = np.ones(scores.shape, bool)
    np.put_along_axis(keep, order[..., :count], False, axis=-1)
    return keep
