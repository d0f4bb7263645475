"""Masked fine-tuning (optimizer.keep_sparsity): a pruned train.init_from keeps every pruned
weight exactly zero through training and a resume, with the masks in the checkpoint."""

import json

import jax
import numpy as np
import pytest

from checkpoints.read import load_run
from checkpoints.write import save_params
from compression.prune import prune
from errors import UserError
from tests.helpers import tiny_config
from training import loop
from training.config import validate_config
from training.optimizer import KeepZerosState

WORDS = "the cat sat on a mat while dogs ran past every tree near old houses".split()


def masks_of(opt_state):
    """The masks of keep_zeros' state in make_optimizer's chain."""
    is_masks = lambda x: isinstance(x, KeepZerosState)
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_masks) if is_masks(s)]
    return state.masks


def _at(tree, path):
    """The subtree of `tree` at a key path of jax.tree_util."""
    for key in path:
        tree = tree[key.key]
    return tree


def init_params(trainer):
    """Params like a fresh model's (zero biases, unit norm scales), drawn in numpy: no compile."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        fill = {"bias": np.zeros, "scale": np.ones}.get(name)
        if fill:
            return fill(leaf.shape, np.float32)
        return rng.normal(0, 0.02, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, trainer.abstract_model_params)


def finetune_config(tmp_path, base):
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS, 60)) for _ in range(40)))
    config = tiny_config(vocab_size=8192)  # the default tokenizer's vocabulary
    config.data.update(
        source="files", train_files=str(text), eval_files=str(text), eval_max_batches=1
    )
    config.train.update(num_steps=3, global_batch_size=8, eval_every=0, init_from=base)
    config.checkpoint.update(every_steps=3, async_save=False)
    # Weight decay on every matrix: the masks zero the decay of pruned weights too.
    config.optimizer.update(
        keep_sparsity=True, warmup_steps=1, weight_decay=0.1, decay_embeddings=True
    )
    config.mesh.update(data=2, fsdp=4, tensor=1)  # masks sharded over fsdp like their params
    return config


def test_pruned_weights_stay_zero_through_training_and_resume(tmp_path, monkeypatch):
    base, workdir = str(tmp_path / "pruned"), str(tmp_path / "run")
    config = finetune_config(tmp_path, base)
    trainer = loop.Trainer(config)
    pruned, _ = prune(
        init_params(trainer),
        trainer.model_config,
        method="magnitude",
        sparsity=0.5,
        include_embeddings=True,
    )
    pruned = jax.device_get(pruned)
    config_dict = json.loads(config.to_json_best_effort())
    save_params(base, pruned, config_dict, trainer.model_config.weight_fields())

    restored_masks = []  # of each restored checkpoint, read before the train step donates them
    resumed_state = loop.Trainer.resumed_state

    def spy(self, restored):
        opt_state = restored.opt_state
        restored_masks.append(None if opt_state is None else jax.device_get(masks_of(opt_state)))
        return resumed_state(self, restored)

    monkeypatch.setattr(loop.Trainer, "resumed_state", spy)
    loop.train(config, workdir)  # from train.init_from: the masks are made from its params
    config.train.num_steps = 5
    loop.train(config, workdir)  # resumes step 3 of its own workdir

    first, masks = restored_masks  # masks: read from checkpoint step 3
    assert first is None  # a params-only start: tx.init on the pruned params makes the masks
    masked = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(masks)}
    assert "['token_embed']" in masked and "['layers']['attn']['out']['kernel']" in masked
    assert not [p for p in masked if "bias" in p or "scale" in p]  # never norms or biases
    for path, mask in jax.tree_util.tree_leaves_with_path(masks):
        np.testing.assert_array_equal(mask, _at(pruned, path) != 0)

    for step in (3, 5):
        trained = jax.device_get(load_run(workdir, step, mesh=trainer.mesh).params)
        for path, before in jax.tree_util.tree_leaves_with_path(pruned):
            after = _at(trained, path)
            where = jax.tree_util.keystr(path)
            zero = before == 0
            if "kernel" in where or "embed" in where:  # kernels and embeddings
                assert (after[zero] == 0).all(), where
            else:  # norm scales and biases (zero at init) train freely
                assert (after != before).all(), where
            if "kernel" in where:  # every other weight of a kernel moved
                assert (after[~zero] != before[~zero]).all(), where


def test_masks_are_sharded_like_their_params():
    config = tiny_config()
    config.optimizer.keep_sparsity = True
    config.mesh.update(data=2, fsdp=4, tensor=1)
    trainer = loop.Trainer(config)
    masks = masks_of(trainer.shardings.opt_state)
    assert "fsdp" in str(masks["token_embed"].spec)
    for path, sharding in jax.tree_util.tree_leaves_with_path(masks):
        assert sharding == _at(trainer.shardings.params, path), jax.tree_util.keystr(path)


def test_keep_sparsity_and_factorized_runs_refuse_lora():
    config = tiny_config()
    config.lora.rank = 2
    config.optimizer.keep_sparsity = True
    with pytest.raises(UserError, match="optimizer.keep_sparsity with lora.rank=2: .*lora.rank=0"):
        validate_config(config, num_devices=8)
    config.optimizer.keep_sparsity = False
    config.model.low_rank_ratio = 0.5
    with pytest.raises(UserError, match="lora.rank=2 with model.low_rank_ratio=0.5: LoRA adapts"):
        validate_config(config, num_devices=8)
