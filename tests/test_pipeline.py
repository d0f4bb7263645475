"""Pipeline parallelism (model/pipeline.py): equal to the unpipelined model on stage x data x
fsdp meshes, bubbles masked, weights gathered once, layers stored split over stages, the bubble
fraction, refusals. (Pipelined training and resuming across stage counts: test_stage_axis.py.)"""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import Transformer, pipeline
from model.config import ModelConfig
from model.pipeline import Schedule
from sharding import activate
from tests.helpers import random_batch, tiny_config
from training.config import validate_config
from training.step import forward_sums
from training.trainer import Trainer

MODEL = dict(num_layers=8, embed_dim=16, num_heads=2, mlp_dim=32, vocab_size=32, max_seq_len=8)
ROWS = 48  # divisible by every case's microbatches x data-parallel size


def _config(mesh_shape=(1, 1, 1), schedule="gpipe", microbatches=0, repeats=1):
    config = tiny_config(**MODEL)
    config.data.seq_len, config.train.global_batch_size = MODEL["max_seq_len"], ROWS
    config.mesh.update(dict(zip(("stage", "data", "fsdp"), mesh_shape)))
    config.pipeline.update(schedule=schedule, microbatches=microbatches, repeats=repeats)
    return config


@functools.cache
def _batch():
    batch = random_batch(_config(), packed=True)  # two documents a row: segment ids matter
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.cache
def _params():
    """The canonical params [layers, ...], the same for every stage count."""
    model = Transformer(ModelConfig.from_dict(_config().model))
    init = jax.jit(model.init)(jax.random.key(0), _batch()["inputs"][:1])
    return nn.meta.unbox(init["params"])


def _loss_and_grads(config):
    """(mean loss with z-loss, its gradients, the compiled HLO) of `config`'s model on its mesh
    (pipelined when mesh.stage > 1), as Trainer builds them."""
    trainer = Trainer(config, devices=jax.devices()[: math.prod(config.mesh.values())])

    def loss(params):
        total, _, weight = forward_sums(trainer.model, params, _batch(), None, 1e-3)
        return total / weight

    params, step = _params(), jax.jit(jax.value_and_grad(loss))
    with activate(trainer.mesh, trainer.rules):
        hlo = step.lower(params).compile().as_text()  # compiled once: the call reuses it
        return (*jax.device_get(step(params)), hlo)


@functools.cache
def _reference():
    return _loss_and_grads(_config())[:2]


def _collectives_in_loops(hlo: str) -> tuple[int, int]:
    """(all-gathers, collective-permutes) inside while-loop bodies of compiled HLO text."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    counts, computation = [0, 0], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header[1]
        elif computation in bodies:
            counts[0] += " all-gather(" in line
            counts[1] += " collective-permute(" in line
    return tuple(counts)


@pytest.mark.parametrize(
    "mesh_shape, schedule, microbatches, repeats",
    [
        ((2, 2, 2), "gpipe", 2, 1),  # M = S
        ((4, 1, 2), "gpipe", 8, 1),  # M > S
        ((4, 2, 1), "circular", 4, 2),  # M = S
        ((2, 1, 4), "circular", 6, 2),  # M > S, not a multiple of S
    ],
)
def test_pipelined_equals_unpipelined_and_bubbles_reach_nothing(
    mesh_shape, schedule, microbatches, repeats, monkeypatch
):
    # Every stage's first input is a bubble's (until the microbatches reach it): make it NaN.
    monkeypatch.setattr(pipeline, "_empty_stages", lambda shape, dtype: jnp.full(shape, jnp.nan))
    config = _config(mesh_shape, schedule, microbatches, repeats)
    loss, grads, hlo = _loss_and_grads(config)
    ref_loss, ref_grads = _reference()
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # NaN fails
    close(loss, ref_loss)
    jax.tree.map(close, grads, ref_grads)
    gathers_in_loops, permutes_in_loops = _collectives_in_loops(hlo)
    assert permutes_in_loops > 0  # the stages pass activations on
    assert gathers_in_loops == 0  # weights are gathered over fsdp once, not per microbatch


@pytest.mark.parametrize("stages, micro, repeats", [(2, 2, 1), (4, 4, 1), (4, 16, 1), (4, 8, 3)])
def test_bubble_fraction_of_the_mask_is_the_formula(stages, micro, repeats):
    schedule = Schedule(stages, micro, repeats)
    mask = schedule.mask()
    assert mask.shape == (micro * repeats + stages - 1, stages)
    assert mask.sum(axis=0).tolist() == [micro * repeats] * stages  # every pass runs once
    assert schedule.bubble_fraction == pytest.approx((stages - 1) / (micro * repeats + stages - 1))


def test_bubble_fraction_of_a_config():
    config = tiny_config(num_layers=8)
    config.mesh.update(stage=4, data=2, fsdp=1)
    config.pipeline.update(schedule="circular", microbatches=8, repeats=2)
    assert pipeline.bubble_fraction(config, 8) == pytest.approx(3 / 19)
    config.mesh.stage, config.mesh.data = 1, -1
    assert pipeline.bubble_fraction(config, 8) == 0.0


@pytest.mark.parametrize(
    "update, message",
    [
        (dict(model=dict(num_layers=6)), r"model.num_layers=6 .* mesh.stage=4 .*: model.num_layers=4 or 8"),
        (
            dict(pipeline=dict(schedule="circular", repeats=2)),
            r"model.num_layers=4 .*pipeline.repeats=2.*model.num_layers=8 or pipeline.repeats in \[1\]",
        ),
        (dict(pipeline=dict(repeats=2)), r"pipeline.repeats=2 needs pipeline.schedule=circular"),
        (dict(pipeline=dict(microbatches=2)), r"pipeline.microbatches=2 < mesh.stage=4; valid: \[4, 8\]"),
        (dict(pipeline=dict(microbatches=5)), r"pipeline.microbatches=5 does not fit.*valid: \[4, 8\]"),
        (dict(train=dict(num_microbatches=4)), r"microbatches=4 does not fit.*= 4 rows.*none"),
        (dict(mesh=dict(data=4)), r"mesh.stage=4 .* needs 16 devices"),
        (dict(model=dict(num_experts=4, mlp_activation="swiglu")), r"model.num_experts=4 with mesh.stage=4"),
    ],
)
def test_refusals_name_the_fields_and_valid_values(update, message):
    config = tiny_config(num_layers=4)  # 16 rows
    config.mesh.update(stage=4, data=2, fsdp=1)
    for section, values in update.items():
        config[section].update(values)
    with pytest.raises(UserError, match=message):
        validate_config(config, 8)


def test_layers_and_their_optimizer_state_are_stored_split_over_stages():
    trainer = Trainer(_config((4, 2, 1)))
    params, opt_state = trainer.shardings.params, trainer.shardings.opt_state
    for tree in (params, opt_state):
        kernels = [s for p, s in jax.tree_util.tree_leaves_with_path(tree) if "query" in str(p)]
        assert kernels and all(s.spec[0] == "stage" for s in kernels), kernels
    assert params["token_embed"].spec[0] != "stage"  # outside the pipeline: replicated
