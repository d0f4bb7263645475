"""Training FLOPs per token, for throughput and MFU reporting.

Two conventions for causal attention are in use, and MFU numbers only compare
within one:
  * PaLM (Chowdhery et al. 2022, appendix B): attention FLOPs counted as if
    every query attended to every key, 12·L·H·Q·T per token. This is the
    default, and what the training log and BENCHMARKS.md report unless they
    say otherwise.
  * MaxText (current `calculate_tflops_training_per_device`,
    `causal_attention_flops = noncausal_attention_flops / 2`): the causal mask
    leaves half of the score matrix unused, so the attention term is halved,
    6·L·H·Q·T per token (`causal_discount=True`).
The matmul-weight term is the same in both: 6N for weights that train (forward 2N,
gradients of input and weight 2N each); 4N for frozen ones, such as a LoRA run's base,
whose weight gradient is never computed (its input gradient still carries the
gradient back to the adapters), plus 6 per adapter weight.

Rematerialization is not counted: MFU counts the FLOPs the model needs, so
recomputing activations (model.remat_policy, the chunked loss's backward) costs time
and lowers MFU, as in PaLM and MaxText (hardware FLOPs utilization, HFU, would count
it; it is not reported). tests/test_flops_and_peaks.py checks the count against the
matmuls of the traced train step: equal without recomputation, below it with.
Attention implementations that skip masked tiles (blockwise, splash, cudnn) run about
the halved attention term, so with them the PaLM count is above what runs by up to
half the attention term.
"""

import jax
import numpy as np

from model.config import ModelConfig
from model.moe import routed_expert_kernels


KERNELS = ("kernel", "kernel_a", "kernel_b")  # a full kernel, or its low-rank factors


def count_params(params) -> int:
    """Number of parameters: elements of every leaf (int8/int4 weights and scales too)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def matmul_params(config: ModelConfig, params) -> int:
    """Weights that take part in a matmul per token: every Dense kernel and the output
    projection (lm_head, or the token embedding when tied); of an MoE layer's routed
    experts, the active ones only (experts_per_token of num_experts), plus the router.

    Biases, norm scales and lookup tables (the position table, an untied token
    embedding) are left out: they cost a few FLOPs per element, not 2 per weight.
    """
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if any(getattr(key, "key", None) in KERNELS for key in path)
    ]
    output = params["token_embed"] if config.tie_embeddings else params["lm_head"]
    total = count_params(kernels) + count_params(output)
    if not config.num_experts:
        return total
    # A token runs experts_per_token of num_experts routed experts: only those count
    # (capacity dispatch computes its empty and dropped slots too; they are not counted).
    experts = count_params(routed_expert_kernels(params))
    active = experts * config.experts_per_token // config.num_experts
    return total - experts + active


def train_flops_per_token(
    config: ModelConfig, params, seq_len: int, causal_discount: bool = False, adapters=None
) -> float:
    """Training FLOPs per token: PaLM's 6N + 12·L·H·Q·T by default (the training log's MFU).

    6N: forward (2N) and backward (4N) multiply-adds of every matmul weight.
    With LoRA `adapters`, `params` is the frozen base: 4N (forward, and the input
    gradient that reaches the adapters; no weight gradient) plus 6 per adapter weight
    (x @ A @ B forward, and both gradients of A and B backward).
    12·L·H·Q·T: the attention scores and weighted values (QK^T and AV, 2 matmuls,
    each 2·H·Q·T FLOPs forward and twice that backward) for L layers, H heads of
    size Q and a context of T tokens, counted in full as in PaLM appendix B.
    `causal_discount=True` halves it to 6·L·H·Q·T, as MaxText does for the causal
    mask; use it only to compare with MFU numbers that were computed that way.
    """
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    if causal_discount:
        attention //= 2
    weights = matmul_params(config, params)
    if adapters is None:
        return 6 * weights + attention
    return 4 * weights + 6 * count_params(adapters) + attention
