"""Low-rank factorization: each targeted kernel W [layers, *in, *out] becomes
kernel_a [layers, *in, r] x kernel_b [layers, r, *out], per layer.

The factorized model is the same Transformer with model.low_rank_ratio > 0: its Dense
declares the two factors (model/layers.py, rank `low_rank`) and applies them with
LoRA's two einsums, so it samples, evaluates and trains like any run.

- "svd": the top r singular triplets of W (flattened to [in_size, out_size]), which
  minimise ||W - A B||_F (Eckart-Young); sqrt(S) goes into each factor.
- "whitened" (SVD-LLM): the rank-r A B that minimises ||X (W - A B)||_F over the
  calibration inputs X, from their Gram matrix G = X^T X: with G + damping = L L^T
  (Cholesky), truncate the SVD of L^T W = U S V^T and map back, A = L^-T U_r sqrt(S_r),
  B = sqrt(S_r) V_r^T. The damping, DAMPING x mean(diag(G)) x I, keeps the Cholesky
  defined where the inputs do not span every direction.

At rank ratio 1 both reproduce W (up to rounding). The linear algebra runs in float64
numpy on the host, one layer at a time: meant for the small models trained here, not
for multi-billion-parameter kernels.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from compression.denses import map_denses
from errors import UserError
from model.config import ModelConfig
from model.layers import low_rank, target_name
from model.lora import TARGETS

METHODS = ("svd", "whitened")
DAMPING = 1e-3  # of the mean input energy mean(diag(G)), added to G's diagonal


def factorize(
    params,
    model_config: ModelConfig,
    *,
    ratio,
    targets="query,key,value,out,mlp",
    method="svd",
    grams=None,
):
    """(params with each targeted kernel factorized, the model config that declares them).

    `params`: the model's plain (unboxed) params with full kernels. `grams`: for
    "whitened", `compression.calibrate.input_statistics(..., gram=True)` of the same
    model. Everything but the targeted kernels (biases, norms, embeddings) is kept.
    """
    new_config = check(model_config, ratio, targets, method, grams)

    def change(module, name, leaves):
        if target_name(name) not in new_config.low_rank_target_names:
            return leaves
        kernel = leaves["kernel"]
        num_in = TARGETS[target_name(name)][1]
        rank = low_rank(new_config, kernel.shape[1:], num_in)
        gram = grams["layers"][module][name]["gram"] if method == "whitened" else None
        a, b = _factor_layers(kernel, num_in, rank, gram)
        rest = {k: v for k, v in leaves.items() if k != "kernel"}
        return dict(rest, kernel_a=a, kernel_b=b)

    return map_denses(params, change), new_config


def check(model_config: ModelConfig, ratio, targets, method, grams) -> ModelConfig:
    """UserError for a bad request; else the factorized model's config."""
    if not 0 < ratio <= 1:
        raise UserError(f"--rank_ratio={ratio}: give a fraction of each kernel's rank in (0, 1].")
    if method not in METHODS:
        raise UserError(f"--low_rank={method!r}: give one of {', '.join(METHODS)}.")
    if method == "whitened" and grams is None:
        raise UserError("--low_rank=whitened needs calibration data (its inputs' Gram matrices).")
    if model_config.low_rank_ratio or model_config.quantization != "none":
        raise UserError(
            f"--low_rank: the run is already factorized (model.low_rank_ratio="
            f"{model_config.low_rank_ratio}) or quantized (model.quantization="
            f"{model_config.quantization!r}); factorize its full-precision, full-rank source."
        )
    values = dict(dataclasses.asdict(model_config), low_rank_ratio=ratio, low_rank_targets=targets)
    return ModelConfig.from_dict(values)  # checks the targets


def _factor_layers(kernel, num_in: int, rank: int, gram):
    """kernel [layers, *in, *out] -> (a [layers, *in, rank], b [layers, rank, *out])."""
    layers, *dims = kernel.shape
    in_shape, out_shape = dims[:num_in], dims[num_in:]
    w = np.asarray(kernel, np.float64).reshape(layers, math.prod(in_shape), -1)
    factors = [
        _factor(w[i], rank, None if gram is None else np.asarray(gram[i], np.float64))
        for i in range(layers)
    ]
    a = np.stack([f[0] for f in factors]).reshape(layers, *in_shape, rank)
    b = np.stack([f[1] for f in factors]).reshape(layers, rank, *out_shape)
    return jnp.asarray(a, kernel.dtype), jnp.asarray(b, kernel.dtype)


def _factor(w, rank: int, gram):
    """Rank-`rank` factors of one layer's w [in, out]: plain (gram None) or whitened."""
    if gram is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]
    damping = max(DAMPING * np.mean(np.diag(gram)), np.finfo(np.float32).tiny)  # all-zero inputs
    damped = gram + damping * np.eye(len(gram))
    chol = np.linalg.cholesky(damped)  # damped = chol @ chol.T
    u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
    root = np.sqrt(s[:rank])
    return np.linalg.solve(chol.T, u[:, :rank] * root), root[:, None] * vt[:rank]
