"""MFU's two inputs: FLOPs per token (both causal conventions) and the peak per device kind."""

import types

import jax
import pytest

from model import ModelConfig, Transformer
from model.flops import train_flops_per_token
from training import hardware


def test_flops_per_token_in_both_causal_conventions():
    config = ModelConfig(
        vocab_size=100, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=16, max_seq_len=32
    )
    tokens = jax.numpy.zeros((1, 4), jax.numpy.int32)
    params = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"]
    # N: every parameter except the 32 x 8 learned position table (a lookup, not a matmul).
    total = sum(x.size for x in jax.tree.leaves(params))
    six_n = 6 * (total - 32 * 8)
    attention = 12 * 2 * 2 * 4 * 32  # 12 * layers * heads * head_dim * context
    assert train_flops_per_token(config, params, 32) == six_n + attention
    assert train_flops_per_token(config, params, 32, causal_discount=True) == six_n + attention / 2


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
    ],
)
def test_peak_matches_the_exact_part(monkeypatch, kind, tflops):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    peak, source = hardware.peak_flops_per_device()
    assert peak == tflops * 1e12
    assert f"{tflops} TFLOP/s" in source


@pytest.mark.parametrize("kind", ["NVIDIA H100 Mystery Edition", "NVIDIA L4", "cpu"])
def test_an_unknown_part_is_measured_not_guessed(monkeypatch, kind):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda dtype: 1.5e12)
    peak, source = hardware.peak_flops_per_device("float32")
    assert peak == 1.5e12 and "measured" in source
