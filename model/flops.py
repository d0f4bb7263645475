"""Training FLOPs per token, for throughput and MFU reporting."""

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


def train_flops_per_token(config: ModelConfig, params, seq_len: int) -> float:
    """6N + 12 * L * H * Q * T (PaLM, appendix B).

    6N: forward (2N) and backward (4N) multiply-adds of every matmul weight.
    12*L*H*Q*T: the attention scores and weighted values (QK^T and AV, 2 matmuls,
    each 2*H*Q*T FLOPs forward and twice that backward) for L layers, H heads of
    size Q and a context of T tokens. Causal masking is not discounted (as in
    PaLM and MaxText), so MFU is comparable with theirs.
    """
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6 * matmul_params(config, params) + attention
