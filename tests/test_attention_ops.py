"""Every attention implementation against the reference: values and gradients, with packed
segments, padding, grouped-query heads and decoding shapes; linear memory for blockwise.

cudnn and splash run natively only on their accelerators (tested there, skipped here);
splash's kernel is also checked on CPU through Pallas' interpreter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from errors import UserError
from model import ModelConfig, Transformer
from model.attention_ops import attend, attention_mask
from model.splash_attention import splash_attention
from sharding import activate, logical_rules
from tests.helpers import LLAMA_STYLE, TINY_MODEL


def inputs(batch=2, length=20, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32, seed=0):
    """Random q/k/v, and segment ids of three packed documents, the last row ending in padding."""
    rng = np.random.default_rng(seed)
    query = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
    key, value = (
        jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), dtype) for _ in "kv"
    )
    segments = np.ones((batch, length), np.int32)
    segments[:, length // 3 :] = 2
    segments[:, 2 * length // 3 :] = 3
    segments[-1, -length // 4 :] = 0  # padding
    return query, key, value, jnp.asarray(segments)


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(fn, query, key, value, weights):
    """fn's output and the gradients of its projection on `weights` w.r.t. q, k, v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    return fn(query, key, value), jax.grad(loss, argnums=(0, 1, 2))(query, key, value)


def assert_matches_reference(fn, query, key, value, segments, atol=2e-5):
    reference = lambda q, k, v: attend(q, k, v, segments, segments, implementation="xla")
    weights = np.random.default_rng(7).normal(size=query.shape).astype(np.float32)
    expected, expected_grads = value_and_grads(reference, query, key, value, weights)
    out, grads = value_and_grads(fn, query, key, value, weights)
    np.testing.assert_allclose(out, expected, atol=atol)
    for name, got, want in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_reference_matches_jax_nn_dot_product_attention(kv_heads):
    """meshlm's reference (its own einsums, with or without a group axis) against JAX's
    library attention on the same mask: MHA, GQA and MQA, packed rows with padding."""
    query, key, value, segments = inputs(kv_heads=kv_heads)
    mask = attention_mask(segments, segments, query.shape[1], key.shape[1])
    library = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
    assert_matches_reference(library, query, key, value, segments)


@pytest.mark.parametrize(
    "length, block_size, kv_heads, packed",
    [
        (20, 8, 2, True),  # GQA, packed + padding, lengths not a multiple of the block
        (16, 4, 4, False),  # MHA, no segment ids, causal key blocks skipped
        (12, 32, 1, True),  # MQA, one block larger than the sequence
    ],
)
def test_blockwise_matches_the_reference(length, block_size, kv_heads, packed):
    query, key, value, segments = inputs(length=length, kv_heads=kv_heads)
    segments = segments if packed else None
    fn = lambda q, k, v: attend(q, k, v, segments, segments, 0, "blockwise", block_size)
    assert_matches_reference(fn, query, key, value, segments)


@pytest.mark.parametrize("implementation", ["blockwise", "cudnn", "splash"])
def test_decoding_shapes_match_the_reference(implementation):
    """A few queries at a traced cache offset over a longer KV cache (decode-shaped calls):
    blockwise computes them itself; cudnn and splash hand them to the reference."""
    query, key, value, segments = inputs(length=24)
    offset, steps = 13, 3
    new = query[:, offset : offset + steps]
    new_segments = segments[:, offset : offset + steps]

    def run(impl, offset):
        return attend(new, key, value, new_segments, segments, offset, impl, block_size=8)

    expected = run("xla", offset)
    out = jax.jit(lambda o: run(implementation, o))(jnp.int32(offset))
    np.testing.assert_allclose(out, expected, atol=2e-5)
    # The same queries in a full causal pass see exactly those keys.
    full = attend(query, key, value, segments, segments)
    np.testing.assert_allclose(out, full[:, offset : offset + steps], atol=2e-5)


def test_the_model_with_blockwise_attention_matches_the_reference():
    """Logits and parameter gradients of a packed batch through the whole model (GQA, remat)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 10, [1] * 12 + [0] * 4])
    positions = jnp.asarray([list(range(6)) + list(range(10)), list(range(12)) + [0] * 4])

    def model(implementation):
        config = dict(TINY_MODEL, **LLAMA_STYLE, remat_policy="full")
        return Transformer(ModelConfig(**config, attention_implementation=implementation))

    def loss(implementation, params):
        logits = model(implementation).apply({"params": params}, tokens, segments, positions)
        return jnp.sum(logits**2)

    params = jax.jit(model("xla").init)(jax.random.key(0), tokens)["params"]
    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    (want, want_grads), (got, grads) = grad("xla", params), grad("blockwise", params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, want_grads
    )


def test_blockwise_memory_grows_linearly_with_length():
    """The reference's gradient holds [b, h, t, t] scores; blockwise's only tiles, so doubling
    the length about doubles its temporaries (the reference's quadruple)."""

    def temp_bytes(implementation, length):
        query, key, value, segments = (
            jax.ShapeDtypeStruct(x.shape[:1] + (length,) + x.shape[2:], x.dtype)
            for x in inputs(batch=1, length=8, heads=4, kv_heads=4, head_dim=16)
        )
        fn = lambda q, k, v, s: attend(q, k, v, s, s, 0, implementation, 128)
        grad = jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), argnums=(0, 1, 2))
        compiled = jax.jit(grad).lower(query, key, value, segments).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise = [temp_bytes("blockwise", n) for n in (1024, 2048)]
    reference = temp_bytes("xla", 2048)
    assert blockwise[1] < 2.5 * blockwise[0], blockwise
    assert blockwise[1] < reference / 8, (blockwise, reference)


def test_splash_kernel_matches_the_reference_in_the_pallas_interpreter():
    query, key, value, segments = inputs(length=256, head_dim=64)
    fn = lambda q, k, v: splash_attention(q, k, v, segments, segments, 128, interpret=True)
    assert_matches_reference(fn, query, key, value, segments, atol=5e-5)


def test_splash_kernel_takes_the_models_score_scale():
    """model.query_pre_attn_scalar's scale, not head_dim's, in the kernel too."""
    query, key, value, segments = inputs(length=128, head_dim=64)
    out = splash_attention(query, key, value, segments, segments, 128, interpret=True, scale=0.05)
    expected = attend(query, key, value, segments, segments, scale=0.05)
    np.testing.assert_allclose(out, expected, atol=5e-5)


def test_splash_runs_per_shard_on_a_mesh():
    """Under a (data, fsdp, tensor) mesh the kernel runs in shard_map on batch and head shards."""
    query, key, value, segments = inputs(batch=4, length=128, head_dim=64)
    mesh = jax.make_mesh(
        (2, 1, 2),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:4],
    )
    with activate(mesh, logical_rules()):
        out = jax.jit(
            lambda q, k, v: splash_attention(q, k, v, segments, segments, 128, interpret=True)
        )(query, key, value)
    expected = attend(query, key, value, segments, segments)
    np.testing.assert_allclose(out, expected, atol=5e-5)


@pytest.mark.parametrize("implementation, backend", [("cudnn", "gpu"), ("splash", "tpu")])
def test_a_kernel_on_the_wrong_backend_is_a_user_error(implementation, backend):
    if jax.default_backend() == backend:
        pytest.skip(f"{backend} present: the kernel runs (see the test below)")
    query, key, value, segments = inputs(length=16)
    with pytest.raises(UserError, match=f"attention_implementation={implementation} needs"):
        attend(query, key, value, segments, segments, implementation=implementation)


@pytest.mark.parametrize("implementation, backend", [("cudnn", "gpu"), ("splash", "tpu")])
def test_fused_kernels_match_the_reference_on_their_accelerator(implementation, backend):
    if jax.default_backend() != backend:
        pytest.skip(f"{implementation} runs only on {backend}: not measured on this machine")
    query, key, value, segments = inputs(length=256, head_dim=64, dtype=jnp.bfloat16)
    fn = lambda q, k, v: attend(q, k, v, segments, segments, 0, implementation, 128)
    assert_matches_reference(fn, query, key, value, segments, atol=5e-2)
