"""Small shared builders for tests: a tiny config, random batches, a sharded setup."""

import jax
import ml_collections
import numpy as np

from configs.base import get_base_config
from model import ModelConfig, Transformer
from sharding import logical_rules, make_mesh
from training.optimizer import make_optimizer
from training.state import init_train_state, state_shardings
from training.step import make_train_step

# Llama-style choices (untied, GQA with 4 KV heads for TINY_MODEL's 8 query heads).
LLAMA_STYLE = dict(
    position_embedding="rope",
    norm="rmsnorm",
    mlp_activation="swiglu",
    use_bias=False,
    tie_embeddings=False,
    num_kv_heads=4,
)

TINY_MODEL = dict(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=8,
    mlp_dim=64,
    max_seq_len=16,
    dtype="float32",
)


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.model.update(TINY_MODEL, **model_overrides)
    config.data.seq_len = 16
    config.train.update(num_steps=10, global_batch_size=16)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)
    return config


def random_batch(config, batch_size=None, seed=0, packed=True) -> dict:
    """A batch of random tokens; with `packed`, each row holds two documents."""
    rng = np.random.default_rng(seed)
    b, t = batch_size or config.train.global_batch_size, config.data.seq_len
    tokens = rng.integers(1, config.model.vocab_size, (b, t + 1), dtype=np.int32)
    segment_ids = np.ones((b, t), np.int32)
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    weights = np.ones((b, t), np.float32)
    if packed:
        split = t // 2 + 1
        segment_ids[:, split:] = 2
        positions[:, split:] -= split
        weights[:, split - 1] = 0.0  # last token of doc 1 does not predict doc 2
        weights[-1, -3:] = 0.0  # and some padding-like zero weights
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=segment_ids,
        positions=positions,
        weights=weights,
    )


def setup(config, mesh_shape=(8, 1, 1)):
    """(model, state, train_step) for `config` on a mesh of the given (data, fsdp, tensor)."""
    model = Transformer(ModelConfig.from_dict(config.model))
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), devices)
    rules = logical_rules(config.sharding_rules)
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
    seq_len = config.data.seq_len
    _, shardings = state_shardings(model, tx, mesh, rules, seq_len)
    state = init_train_state(model, tx, mesh, rules, config.seed, seq_len)
    step = make_train_step(
        model,
        tx,
        schedule,
        mesh,
        rules,
        shardings,
        num_microbatches=config.train.num_microbatches,
        z_loss_weight=config.train.z_loss_weight,
        seed=config.seed,
    )
    return model, state, step
