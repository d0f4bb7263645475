"""Distillation: the loss against numpy, its gradient against jax.grad, alpha = 0 is today's
loss, a teacher equal to its student teaches nothing, the teacher stays frozen and out of the
checkpoint, resume after a kill is exact, the dry run counts the teacher, bad teachers are
refused before anything compiles."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from checkpoints.write import save_params
from data.tokenizer import DEFAULT_TOKENIZER
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from tests.helpers import random_batch, tiny_config, train_until_killed
from tests.test_resume_and_preemption import saved_params
from tests.test_train_loop import checkpoint_steps, small_config
from training import loop
from training.distill import DistillConfig
from training.loss import chunked_kl_sum
from training.memory import describe, shard_bytes
from training.step import distill_sums, forward_sums
from training.trainer import Trainer

TEACHER = dict(num_layers=3, embed_dim=48, mlp_dim=96)  # deeper and wider than TINY_MODEL


def save_run(workdir, config, params=None) -> str:
    """A params-only checkpoint of `config`'s model (its init, or `params`) in `workdir`."""
    trainer = Trainer(config)
    params = trainer.init_state().params if params is None else params
    config_dict = json.loads(config.to_json_best_effort())
    save_params(str(workdir), params, config_dict, trainer.model_config.weight_fields())
    return str(workdir)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("teacher"), tiny_config(**TEACHER))


def student(teacher, **distill):
    config = tiny_config()
    config.distill.update(teacher=teacher, **distill)
    return config


# The loss against numpy and its gradient against jax.grad --------------------------------


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_losses(s_logits, t_logits, targets, w, distill, z_loss):
    """(total, CE sum, KL sum) in float64: alpha*T^2*KL + (1 - alpha)*(CE + z-loss)."""
    temperature, alpha = distill.temperature, distill.alpha
    log_s, log_t = log_softmax(s_logits / temperature), log_softmax(t_logits / temperature)
    if distill.kl == "reverse":
        kl = (np.exp(log_s) * (log_s - log_t)).sum(-1)
    else:
        kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    log_z = np.log(np.exp(s_logits).sum(-1))
    ce = log_z - np.take_along_axis(s_logits, targets[..., None], -1)[..., 0]
    ce_sum, kl_sum = (ce * w).sum(), (kl * w).sum()
    hard = ce_sum + z_loss * (np.square(log_z) * w).sum()
    return alpha * temperature**2 * kl_sum + (1 - alpha) * hard, ce_sum, kl_sum


@pytest.fixture(scope="module")
def two_models():
    """A batch with a loss mask; the student's model and params; the teacher's hidden states
    and output projection; both models' logits in float64."""
    student_config, teacher_config = tiny_config(), tiny_config(**TEACHER)
    batch = random_batch(student_config, batch_size=4)
    batch["weights"][1, 3:9] = 0.0  # an SFT loss mask: prompt tokens do not count
    batch = {**batch, "segment_ids": None, "positions": None}  # one document per row
    models, logits = [], []
    for seed, config in enumerate((student_config, teacher_config)):
        model = Transformer(ModelConfig.from_dict(config.model))
        params = jax.jit(model.init)(jax.random.key(seed), batch["inputs"])["params"]
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_hidden=True))
        hidden, output = apply(params, batch["inputs"])
        models.append((model, params, (hidden, output)))
        logits.append(np.asarray(hidden, np.float64) @ np.asarray(output, np.float64))
    (model, params, _), (_, _, teacher_out) = models
    return batch, model, params, teacher_out, logits


@pytest.mark.parametrize("chunk_size", [0, 5])  # whole length; 16 positions in ragged chunks
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_the_distillation_loss_equals_numpy(two_models, chunk_size, kl):
    batch, model, params, teacher_out, logits = two_models
    model = Transformer(dataclasses.replace(model.config, loss_chunk_size=chunk_size))
    distill = DistillConfig(temperature=2.0, alpha=0.3, kl=kl)
    sums = lambda p, b, t: distill_sums(model, p, b, None, 1e-2, None, distill, t)
    total, ce_sum, kl_sum, weight_sum = jax.jit(sums)(params, batch, teacher_out)
    want = numpy_losses(*logits, batch["targets"], batch["weights"], distill, 1e-2)
    np.testing.assert_allclose([total, ce_sum, kl_sum], want, rtol=1e-5, atol=1e-5)
    assert weight_sum == batch["weights"].sum()


def kl_problem(length=13, teacher_embed=6):
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    weights = jnp.asarray(rng.random((3, length)) > 0.2, jnp.float32)
    return normal(3, length, 8), normal(8, 50), normal(3, length, teacher_embed), normal(
        teacher_embed, 50
    ), weights


def plain_kl_sum(s_hidden, s_output, t_hidden, t_output, weights, temperature, reverse):
    log_s = jax.nn.log_softmax(s_hidden @ s_output / temperature)
    log_t = jax.nn.log_softmax(t_hidden @ t_output / temperature)
    if reverse:
        return jnp.sum(weights * jnp.sum(jnp.exp(log_s) * (log_s - log_t), -1))
    return jnp.sum(weights * jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1))


@pytest.mark.parametrize("chunk_size", [0, 4, 13])  # whole, ragged last chunk, exact
@pytest.mark.parametrize("reverse", [False, True])
def test_the_chunked_kl_gradient_equals_jax_grad_of_the_plain_formula(chunk_size, reverse):
    args = kl_problem()
    chunked = lambda *a: chunked_kl_sum(*a, 2.0, reverse, chunk_size)
    plain = lambda *a: plain_kl_sum(*a, 2.0, reverse)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 4)))(*args)
    (value, grads), (want_value, want_grads) = grad(chunked), grad(plain)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for name, got, want in zip(("hidden", "output", "weights"), grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    teacher_grads = jax.grad(chunked, argnums=(2, 3))(*args)  # the teacher is frozen
    assert all(not np.any(g) for g in teacher_grads)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_student_equal_to_its_teacher_has_zero_kl_and_zero_kl_gradient(reverse):
    s_hidden, s_output, _, _, weights = kl_problem()
    kl = lambda h, o: chunked_kl_sum(h, o, s_hidden, s_output, weights, 2.0, reverse, 4)
    value, grads = jax.value_and_grad(kl, argnums=(0, 1))(s_hidden, s_output)
    assert float(value) == 0.0
    assert all(not np.any(g) for g in grads)


# The train step ----------------------------------------------------------------------------


def run_steps(config, num_steps=1):
    """(metrics of each step, final state, trainer, teacher params or None) from the init,
    on one device (the tests of the loop below use eight)."""
    trainer = Trainer(config, devices=jax.devices()[:1])
    state = trainer.init_state()
    teacher = trainer.teacher.load() if trainer.teacher else None
    batch = trainer.to_global(random_batch(config))
    history = []
    for _ in range(num_steps):
        state, metrics = trainer.train_step(state, batch, *([teacher] if teacher else []))
        history.append(jax.device_get(metrics))
    return history, state, trainer, teacher


@pytest.mark.parametrize("chunk_size", [0, 8])  # whole logits; two chunks
def test_alpha_zero_is_exactly_the_loss_without_a_teacher(two_models, chunk_size):
    batch, model, params, teacher_out, _ = two_models
    model = Transformer(dataclasses.replace(model.config, loss_chunk_size=chunk_size))
    distill = DistillConfig(alpha=0.0, temperature=2.0)
    distilled = lambda p: distill_sums(model, p, batch, None, 1e-2, None, distill, teacher_out)
    alone = lambda p: forward_sums(model, p, batch, None, 1e-2)
    value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda p: f(p)[0]))(params)
    (loss, grads), (want_loss, want_grads) = value_and_grad(distilled), value_and_grad(alone)
    assert loss == want_loss
    jax.tree.map(np.testing.assert_array_equal, grads, want_grads)
    assert jax.jit(distilled)(params)[2] > 0  # the KL is measured, but not in the loss


def test_a_student_distilled_from_itself_gets_no_kl_and_no_gradient(tmp_path):
    config = tiny_config()
    trainer = Trainer(config)
    teacher = save_run(tmp_path, config, trainer.init_state().params)  # the same init (seed)
    (metrics,), _, _, _ = run_steps(student(teacher, alpha=1.0))
    assert abs(metrics["distill_kl"]) < 1e-6 and metrics["grad_norm"] < 1e-5, metrics


def test_the_teacher_stays_frozen_and_microbatches_and_lora_still_work(teacher_dir):
    config = student(teacher_dir, temperature=2.0, kl="reverse")
    config.lora.rank = 4
    history, state, trainer, teacher = run_steps(config, num_steps=3)
    assert history[-1]["loss"] < history[0]["loss"]
    assert "teacher" not in str(jax.tree.structure(state))  # never optimised nor checkpointed
    assert set(state.params) == {"base", "lora"}
    saved = trainer.teacher.load()
    jax.tree.map(np.testing.assert_array_equal, teacher, saved)  # unchanged after steps

    config.train.num_microbatches = 2
    (accumulated,), _, _, _ = run_steps(config)
    for name in ("loss", "cross_entropy", "distill_kl"):
        np.testing.assert_allclose(accumulated[name], history[0][name], rtol=1e-5, err_msg=name)


def test_the_dry_run_counts_the_teacher_once_and_chunks_the_kl(tmp_path):
    """The step's memory is the student's, the teacher's params and a few [batch, chunk,
    vocab] chunks: less than one whole [batch, length, vocab] float32 logits array."""
    shape = dict(vocab_size=4096, max_seq_len=256, loss_chunk_size=16)
    teacher = save_run(tmp_path, tiny_config(**TEACHER, **shape))
    config = student(teacher)
    config.model.update(shape)
    config.data.seq_len = 256
    trainer = Trainer(config)
    distilled = trainer.dry_run()
    config.distill.teacher = ""
    alone = Trainer(config).dry_run()
    rows = config.train.global_batch_size // 8  # per device
    whole_logits = rows * 256 * 4096 * 4
    teacher_bytes = distilled["teacher_params_bytes"]
    assert teacher_bytes == shard_bytes(trainer.teacher.abstract_params) > 0
    extra = distilled["per_device_bytes"] - alone["per_device_bytes"]
    assert teacher_bytes < extra < teacher_bytes + whole_logits, (extra, teacher_bytes)
    assert any("teacher params" in line for line in describe(distilled))


# Resume ------------------------------------------------------------------------------------



def test_resume_after_a_kill_gives_the_same_losses(tmp_path, monkeypatch):
    """Killed before step 8, after logging steps 1-6; resumed from checkpoint 4, steps 5 and 6
    are computed again and logged a second time, bitwise the same."""
    teacher = save_run(tmp_path / "teacher", small_config(**{"model.num_layers": 2}))
    config = small_config(
        **{
            "train.num_steps": 8,
            "checkpoint.every_steps": 4,
            "train.eval_every": 0,
            "model.num_layers": 1,
            "distill.teacher": teacher,
            "distill.temperature": 2.0,
        }
    )
    workdir = str(tmp_path / "student")
    train_until_killed(config, workdir, 8, monkeypatch)
    assert checkpoint_steps(workdir) == [4]
    loop.train(config, workdir)  # the teacher is read again
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            records.setdefault(record["step"], []).append(record)
    assert sorted(records) == list(range(1, 9))
    assert [len(records[step]) for step in (5, 6)] == [2, 2]
    for step in (5, 6):  # bitwise: the student's state, the data order and the teacher
        before, after = records[step]
        assert before["loss"] == after["loss"] and before["distill_kl"] == after["distill_kl"]
    assert checkpoint_steps(workdir) == [4, 8]
    saved = saved_params(workdir, 8)  # the student's params alone: no teacher in checkpoints
    assert jax.tree.structure(saved) == jax.tree.structure(Trainer(config).abstract_state.params)


# Refusals ----------------------------------------------------------------------------------


def refused(config, *fragments):
    with pytest.raises(UserError) as error:
        Trainer(config)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def test_a_teacher_without_the_checkpoint_is_refused(tmp_path, teacher_dir):
    missing = str(tmp_path / "missing")
    refused(student(missing), f"distill.teacher={missing!r}", "has no checkpoint")
    refused(student(str(tmp_path)), f"distill.teacher={str(tmp_path)!r}", "has no checkpoint")
    refused(student(teacher_dir, teacher_step=7), "distill.teacher_step=7", "no such step")


def test_a_teacher_with_another_tokenizer_or_vocabulary_is_refused(tmp_path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(DEFAULT_TOKENIZER, "rb").read())
    proto.pieces[300].score += 1.0  # the same vocabulary size, another tokenizer
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    teacher_config = tiny_config()
    teacher_config.data.tokenizer = str(other)
    teacher = save_run(tmp_path / "teacher", teacher_config)
    refused(student(teacher), f"teacher's tokenizer {other}", f"data.tokenizer {DEFAULT_TOKENIZER}")

    wider = save_run(tmp_path / "wider", tiny_config(vocab_size=128))
    refused(student(wider), "model.vocab_size=128", "model.vocab_size=64")

    short_config = tiny_config(max_seq_len=8)
    short_config.data.seq_len = 8
    short = save_run(tmp_path / "short", short_config)
    refused(student(short), "model.max_seq_len=8", "data.seq_len=16")
