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
The 6N term is the same in both.
"""

import jax
import numpy as np

from model.config import ModelConfig


def matmul_params(config: ModelConfig, params) -> int:
    """Parameters that take part in a matmul per token.

    Every parameter counts except the lookup tables: the learned position table,
    and the token embedding when it is not also the (tied) output projection.
    """
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lookups = 0
    if config.position_embedding == "learned":
        lookups += config.max_seq_len * config.embed_dim
    if not config.tie_embeddings:
        lookups += config.vocab_size * config.embed_dim
    return total - lookups


def train_flops_per_token(
    config: ModelConfig, params, seq_len: int, causal_discount: bool = False
) -> float:
    """Training FLOPs per token: PaLM's 6N + 12·L·H·Q·T by default (the training log's MFU).

    6N: forward (2N) and backward (4N) multiply-adds of every matmul weight.
    12·L·H·Q·T: the attention scores and weighted values (QK^T and AV, 2 matmuls,
    each 2·H·Q·T FLOPs forward and twice that backward) for L layers, H heads of
    size Q and a context of T tokens, counted in full as in PaLM appendix B.
    `causal_discount=True` halves it to 6·L·H·Q·T, as MaxText does for the causal
    mask; use it only to compare with MFU numbers that were computed that way.
    """
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    if causal_discount:
        attention //= 2
    return 6 * matmul_params(config, params) + attention
