"""Small shared builders for tests: a tiny config, random batches, a sharded setup."""

import jax
import ml_collections
import numpy as np

from configs.base import get_base_config
from data import batch as data_batch
from training.trainer import Trainer

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
    """A random batch of `config`'s shape (data/batch.py); packed rows hold two documents."""
    b = batch_size or config.train.global_batch_size
    return data_batch.random_batch(b, config.data.seq_len, config.model.vocab_size, seed, packed)


def setup(config, mesh_shape=(8, 1, 1)):
    """(model, state, train_step) for `config` on a mesh of the given (data, fsdp, tensor)."""
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    trainer = Trainer(config, devices=jax.devices()[: int(np.prod(mesh_shape))])
    return trainer.model, trainer.init_state(), trainer.train_step


class Killed(Exception):
    """Stands for SIGKILL: the run stops between two steps, everything in memory lost."""


def train_until_killed(config, workdir: str, call: int, monkeypatch) -> None:
    """`training.loop.train(config, workdir)`, killed (Killed raised) at its `call`-th train
    step call, before that step runs: the steps before it are done, logged and saved as the
    config says, like a run that received SIGKILL there."""
    import pytest

    from training import loop

    teacher_step = loop.Trainer.teacher_step

    def dies_at_call(trainer, train_step):
        step, calls = teacher_step(trainer, train_step), []

        def dies(state, batch, *teacher_params):
            calls.append(1)
            if len(calls) == call:
                raise Killed
            return step(state, batch, *teacher_params)

        return dies

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "teacher_step", dies_at_call)
        with pytest.raises(Killed):
            loop.train(config, workdir)


def assert_greedy_matches_hf(sampler, hf_model, prompts, eos: int, max_new_tokens: int = 10):
    """Greedy generation by meshlm's Sampler (KV cache) equals transformers' `generate`,
    prompt by prompt."""
    import torch

    from model.sampler import SamplingConfig

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    for prompt, new in zip(prompts, sampler.generate(prompts, config, eos)):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=0,
            )
        assert new == out[0, len(prompt) :].tolist()
