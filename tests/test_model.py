"""The model's behaviour: causality, segment isolation, variants, logical names."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import ModelConfig, Transformer
from tests.helpers import LLAMA_STYLE, TINY_MODEL

VARIANTS = {
    "gpt2": dict(),
    "llama_gqa": dict(LLAMA_STYLE, num_kv_heads=2),
    "sinusoidal_remat": dict(position_embedding="sinusoidal", remat_policy="full", scan_unroll=2),
}


def init(config: ModelConfig, length=16):
    model = Transformer(config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
    return model, variables


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_changing_a_token_changes_no_earlier_logit(variant):
    model, variables = init(ModelConfig(**TINY_MODEL, **VARIANTS[variant]))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    before = model.apply(variables, tokens)
    after = model.apply(variables, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-4  # the change is visible later on


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packed_documents_do_not_see_each_other(variant):
    """A document's logits are the same alone or packed after another document."""
    model, variables = init(ModelConfig(**TINY_MODEL, **VARIANTS[variant]))
    doc_a = jax.random.randint(jax.random.key(1), (1, 6), 0, 64)
    doc_b = jax.random.randint(jax.random.key(2), (1, 10), 0, 64)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    packed_logits = model.apply(variables, packed, segments, positions)
    alone = model.apply(variables, doc_b)
    np.testing.assert_allclose(packed_logits[:, 6:], alone, atol=1e-5)


def test_logits_are_float32_with_bfloat16_compute():
    model, variables = init(ModelConfig(**{**TINY_MODEL, "dtype": "bfloat16"}))
    logits = model.apply(variables, jnp.zeros((1, 16), jnp.int32))
    assert logits.dtype == jnp.float32
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32  # params stay float32


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_has_one_logical_name_per_dimension(variant):
    config = ModelConfig(**TINY_MODEL, **VARIANTS[variant])
    boxed = jax.eval_shape(lambda: init(config)[1])["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) > 5
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no names"
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names)


def test_scan_stacks_layers_on_a_leading_axis():
    config = ModelConfig(**TINY_MODEL)
    params = jax.eval_shape(lambda: nn.meta.unbox(init(config)[1]))["params"]
    assert params["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 8, 4)
    assert params["layers"]["mlp"]["wi"]["kernel"].shape == (2, 32, 64)
    assert "lm_head" not in params and "pos_embed" in params


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_heads=8, num_kv_heads=3), "num_kv_heads"),
        (dict(embed_dim=30, num_heads=8), "embed_dim"),
        (dict(norm="batchnorm"), "norm"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(scan_unroll=0), "scan_unroll"),
    ],
)
def test_bad_model_configs_name_the_field(overrides, field):
    with pytest.raises(UserError, match=f"model.{field}="):
        ModelConfig(**{**TINY_MODEL, **overrides})


def test_unknown_model_key_is_named():
    with pytest.raises(UserError, match="num_layer"):
        ModelConfig.from_dict({**TINY_MODEL, "num_layer": 3})


def test_derived_values_are_resolved_once_with_one_name_each():
    config = ModelConfig(**{**TINY_MODEL, "num_kv_heads": 0, "head_dim": 0})
    assert (config.num_kv_heads, config.head_dim) == (8, 4)  # num_heads, embed_dim // num_heads
    gqa = ModelConfig(**{**TINY_MODEL, "num_kv_heads": 2, "head_dim": 6})
    assert (gqa.num_kv_heads, gqa.head_dim) == (2, 6)
    assert ModelConfig.from_dict(dataclasses.asdict(gqa)) == gqa  # resolving again is a no-op
    assert "dtype" not in gqa.weight_fields() and "num_layers" in gqa.weight_fields()
