"""MFU's two inputs: FLOPs per token (both causal conventions, LoRA) and the peak per device
kind; and that MFU cannot pass 100 %: the counted FLOPs are at most the matmul FLOPs of the
traced step, and a CPU's peak is measured on every matmul form the step runs."""

import types

import jax
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from configs import default
from model import ModelConfig, Transformer
from model.flops import train_flops_per_token
from model.lora import LoraConfig, init_adapters
from sharding import activate
from tests.helpers import LLAMA_STYLE, tiny_config
from training import hardware
from training.trainer import Trainer

TINY = ModelConfig(
    vocab_size=100, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=16, max_seq_len=32
)


def tiny_params():
    tokens = jax.numpy.zeros((1, 4), jax.numpy.int32)
    return jax.eval_shape(Transformer(TINY).init, jax.random.key(0), tokens)["params"]


def test_flops_per_token_in_both_causal_conventions():
    """Counted by hand, so a changed formula or parameter count shows up as a number."""
    params = tiny_params()
    # Matmul weights per layer: q, k, v, out kernels 4·8·8 = 256; MLP kernels 2·8·16 = 256.
    # 512 x 2 layers = 1,024, plus the tied token embedding (the output matmul) 100·8 = 800.
    # Biases, norm scales and the 32·8 learned position table are no matmul weights.
    # N = 1,824, 6N = 10,944.
    six_n = 10_944
    attention = 12 * 2 * 2 * 4 * 32  # 12 · layers · heads · head_dim · context = 6,144
    assert train_flops_per_token(TINY, params, 32) == six_n + attention == 17_088
    halved = train_flops_per_token(TINY, params, 32, causal_discount=True)
    assert halved == six_n + attention // 2 == 14_016


def test_lora_counts_no_weight_gradient_of_the_frozen_base():
    """Frozen base: 4 FLOPs per weight (forward, input gradient); adapters 6 per weight."""
    params = tiny_params()
    adapters = jax.eval_shape(lambda: init_adapters(jax.random.key(1), params, LoraConfig(rank=2)))
    # query and value (the default targets) of 2 layers: A 8·2 + B 2·(2·4) = 32 each, 128 in all.
    four_n, adapter_flops, attention = 4 * 1_824, 6 * 128, 6_144
    flops = train_flops_per_token(TINY, params, 32, adapters=adapters)
    assert flops == four_n + adapter_flops + attention == 14_208


def dot_flops(jaxpr) -> int:
    """FLOPs of every matmul in `jaxpr` (2 x output size x contracted size), a scan's body
    times its length: what the traced step asks XLA to multiply, recomputation included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * eqn.outvars[0].aval.size * int(np.prod([lhs[d] for d in contracted]))
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += times * sum(dot_flops(sub) for sub in jaxprs_in_params(eqn.params))
    return total


def dot_forms(jaxpr) -> set:
    """(lhs, rhs, output) dtype names of every matmul in `jaxpr`."""
    forms = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            forms.add(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
        for sub in jaxprs_in_params(eqn.params):
            forms |= dot_forms(sub)
    return forms


def traced_step(config):
    """(trainer, jaxpr of its train step) for `config` on one device, traced from shapes."""
    trainer = Trainer(config, devices=jax.devices()[:1])
    with activate(trainer.mesh, trainer.rules):
        jaxpr = jax.make_jaxpr(trainer.train_step.jitted)(
            trainer.abstract_state, trainer.abstract_batch()
        )
    return trainer, jaxpr.jaxpr


def with_lora(config, **lora):
    config.lora.update(dict(rank=2), **lora)
    return config


def in_microbatches(config, num_microbatches=2):
    config.train.num_microbatches = num_microbatches
    return config


STEP_CONFIGS = {  # name: (config, whether the step recomputes: remat, the chunked loss)
    "configs/default.py": (default.get_config(), False),
    "float32": (tiny_config(), False),
    "bfloat16": (tiny_config(dtype="bfloat16"), False),
    "remat": (tiny_config(remat_policy="full"), True),
    "microbatches, chunked loss": (in_microbatches(tiny_config(loss_chunk_size=8)), True),
    "lora": (with_lora(tiny_config()), False),
    "lora bfloat16 llama": (
        with_lora(tiny_config(dtype="bfloat16", **LLAMA_STYLE), targets="out,mlp"),
        False,
    ),
    "lora remat": (with_lora(tiny_config(remat_policy="full")), True),
}


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_counted_flops_never_exceed_the_steps_matmuls(name):
    """MFU stays under 100 %: a step's counted FLOPs are at most the matmul FLOPs the step
    itself runs (its traced jaxpr, counted independently of model/flops.py), and equal to
    them when nothing is recomputed (MFU leaves recomputation out)."""
    config, recomputes = STEP_CONFIGS[name]
    trainer, jaxpr = traced_step(config)
    tokens = config.train.global_batch_size * config.data.seq_len
    counted, run = trainer.flops_per_token * tokens, dot_flops(jaxpr)
    assert counted < run if recomputes else counted == run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_peak_is_measured_on_every_matmul_form_the_step_runs(monkeypatch, dtype):
    """A bfloat16 step's logits accumulate in float32, which a CPU may run far faster than a
    bfloat16-output matmul: a peak measured on fewer forms than the step runs can sit below
    the step's own matmul rate (MFU over 100 %)."""
    config = with_lora(tiny_config(dtype=dtype, **LLAMA_STYLE), targets="query,mlp")
    _, jaxpr = traced_step(config)
    measured, jit = set(), jax.jit

    def recording_jit(fun):
        def run(*args):
            measured.update(dot_forms(jax.make_jaxpr(fun)(*args).jaxpr))
            return jit(fun)(*args)

        return run

    monkeypatch.setattr(jax, "jit", recording_jit)
    hardware.measured_matmul_flops.__wrapped__(dtype, size=64, repeats=1)
    assert dot_forms(jaxpr) <= measured


def fake_device(monkeypatch, kind, measured=1.5e12):
    """Pretend the first device is `kind`; the "measured" peak is a constant, nothing is timed."""
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda dtype: measured)


@pytest.mark.parametrize(
    "kind, row, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "H100 NVL", 835),
        ("NVIDIA H200", "H200 SXM", 989),
        ("NVIDIA H200 NVL", "H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "A100", 312),
        ("TPU v4", "TPU v4", 275),
        ("TPU v5 lite", "TPU v5e", 197),
        ("TPU v5", "TPU v5p", 459),
        ("TPU v5p", "TPU v5p", 459),
        ("TPU v6 lite", "TPU v6e", 918),
    ],
)
def test_peak_matches_the_exact_part(monkeypatch, kind, row, tflops):
    fake_device(monkeypatch, kind)
    peak, source = hardware.peak_flops_per_device()
    assert peak == tflops * 1e12
    assert source.startswith(f"table row {row}: {tflops} TFLOP/s")


@pytest.mark.parametrize(
    "kind", ["NVIDIA H100", "NVIDIA H100 Mystery Edition", "NVIDIA H800", "TPU v4 lite", "cpu"]
)
def test_an_unknown_part_is_measured_not_guessed(monkeypatch, kind):
    """A kind that only shares a prefix with a table row must not get that row's peak."""
    fake_device(monkeypatch, kind)
    peak, source = hardware.peak_flops_per_device("float32")
    assert peak == 1.5e12
    assert source.startswith("measured: fastest 2048^3 matmul of float32 inputs, 1.5 TFLOP/s")


@pytest.mark.parametrize("kind, share", [("cpu", 4), ("NVIDIA H800", 1)])
def test_cpu_devices_share_the_hosts_measured_peak(monkeypatch, kind, share):
    """JAX_NUM_CPU_DEVICES=4 splits one host into 4 devices: the matmul measured on one of
    them ran on every core, so each device's peak (MFU's denominator) is a quarter of it.
    Accelerators measure their own device."""
    fake_device(monkeypatch, kind)
    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    peak, source = hardware.peak_flops_per_device("float32")
    assert peak == 1.5e12 / share
    assert source.endswith("shared by 4 CPU devices") == (share == 4)
