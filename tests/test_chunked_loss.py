"""The chunked cross-entropy equals the full one (sums and gradients, with z-loss), in a sharded
train step too, and never holds the whole logits; the dry run says where memory goes."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from data.batch import BATCH_FIELDS
from tests.helpers import LLAMA_STYLE, random_batch, tiny_config
from training.loss import chunked_cross_entropy_sums, cross_entropy_sums
from training.memory import largest_arrays
from training.trainer import Trainer

Z_LOSS = 1e-2


def problem(batch=3, length=13, embed=8, vocab=50, dtype=jnp.float32):
    """Hidden states, an output projection, targets, and weights with zeros (padding)."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(batch, length, embed)), dtype)
    output = jnp.asarray(rng.normal(size=(embed, vocab)), dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, length)) > 0.2, jnp.float32)
    return hidden, output, targets, weights


def full_sums(hidden, output, targets, weights):
    logits = jnp.einsum("bte,ev->btv", hidden, output, preferred_element_type=jnp.float32)
    return cross_entropy_sums(logits, targets, weights, Z_LOSS)


@functools.partial(jax.jit, static_argnums=0)
def sums_and_grads(loss, hidden, output, targets, weights):
    """The three sums, and the gradients of total + 0.3·ce_sum + 0.1·weight_sum (so every
    output's cotangent is exercised) w.r.t. hidden, output and weights."""
    objective = lambda h, o, w: jnp.dot(jnp.stack(loss(h, o, targets, w)), jnp.array([1, 0.3, 0.1]))
    return loss(hidden, output, targets, weights), jax.grad(objective, (0, 1, 2))(
        hidden, output, weights
    )


@pytest.mark.parametrize("chunk_size", [4, 13, 64])  # ragged last chunk, exact, one chunk
def test_chunked_loss_equals_the_full_loss_and_its_gradients(chunk_size):
    args = problem()
    chunked = lambda *a: chunked_cross_entropy_sums(*a, Z_LOSS, chunk_size)
    want_sums, want_grads = sums_and_grads(full_sums, *args)
    sums, grads = sums_and_grads(chunked, *args)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-6)
    for name, got, want in zip(("hidden", "output", "weights"), grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_chunked_loss_in_bfloat16_is_close_to_the_full_loss():
    args = problem(length=32, embed=32, vocab=256, dtype=jnp.bfloat16)
    chunked = lambda *a: chunked_cross_entropy_sums(*a, Z_LOSS, 8)
    want_sums, want_grads = sums_and_grads(full_sums, *args)
    sums, grads = sums_and_grads(chunked, *args)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5)
    for got, want in zip(grads[:2], want_grads[:2]):  # bf16 gradients: a few ulps apart
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2 * scale
        )


def test_chunked_loss_never_holds_the_whole_logits():
    batch, length, vocab = 2, 512, 8192
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in problem(batch, length, 16, vocab)]
    logits_bytes = batch * length * vocab * 4

    def temp_bytes(loss):
        grad = jax.grad(lambda h, o, t, w: loss(h, o, t, w)[0], argnums=(0, 1))
        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda *a: chunked_cross_entropy_sums(*a, Z_LOSS, 32))
    assert temp_bytes(full_sums) > logits_bytes  # the reference does hold them
    assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def chunked_trainer(chunk_size, **model):
    config = tiny_config(**LLAMA_STYLE, loss_chunk_size=chunk_size, **model)
    config.train.z_loss_weight = Z_LOSS
    config.optimizer.warmup_steps = 0
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return Trainer(config)


def test_a_train_step_with_the_chunked_loss_equals_the_full_one():
    """Same loss, gradient norm and updated params on a data x FSDP x tensor mesh, and the
    chunked step (so model.loss_chunk_size reaches it) holds no [rows, 16, vocab/2] logits."""
    trainers = [chunked_trainer(0), chunked_trainer(5)]  # 5 does not divide seq_len=16
    state = trainers[0].init_state()
    batch = trainers[0].to_global(random_batch(trainers[0].config, seed=1))
    results = []
    for trainer in trainers:  # the step donates its state: each gets a copy
        new_state, metrics = trainer.train_step(jax.tree.map(jnp.copy, state), batch)
        results.append(jax.device_get((metrics, new_state.params)))
    (full, full_params), (chunked, chunked_params) = results
    for name in ("loss", "cross_entropy", "grad_norm", "num_tokens"):
        np.testing.assert_allclose(chunked[name], full[name], rtol=1e-5, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked_params, full_params
    )
    # Logits per device: [rows, seq_len=16, vocab=96 over tensor=2]; 96 is no other dimension.
    compiled = [chunked_trainer(c, vocab_size=96).compile()[0].as_text() for c in (0, 5)]
    whole_logits = [
        [r for r in largest_arrays(text, 10_000) if r["shape"][1:] == (16, 48)] for text in compiled
    ]
    assert whole_logits[0] and not whole_logits[1], whole_logits


def test_the_dry_run_says_where_memory_goes(tmp_path, capsys):
    """Parameters and optimizer state add up to the step's state arguments, and the largest
    array of a large-vocabulary model is named as the logits, with the knob that chunks them."""
    config = tiny_config(vocab_size=4096)
    config.mesh.update(data=2, fsdp=4)
    config.train.global_batch_size = 64  # logits [8, 16, 4096] per device
    train.run(config, str(tmp_path), dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[-1])
    state_bytes = report["params_bytes"] + report["opt_state_bytes"]
    # A causal model's step never reads the batch's prefix_mask, so jit drops that argument.
    batch_bytes = report["batch_bytes"] * (len(BATCH_FIELDS) - 1) // len(BATCH_FIELDS)
    assert 0 < report["argument_bytes"] - batch_bytes - state_bytes <= 64  # the step
    largest = report["largest_arrays"][0]
    assert largest["kind"] == "logits" and largest["shape"][-1] == 4096, largest
    assert any(line.startswith("  optimizer state") for line in lines)
    assert any("[logits: model.loss_chunk_size]" in line for line in lines)
