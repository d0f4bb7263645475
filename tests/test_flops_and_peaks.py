"""MFU's two inputs: FLOPs per token (both causal conventions) and the peak per device kind."""

import types

import jax
import pytest

from model import ModelConfig, Transformer
from model.flops import train_flops_per_token
from training import hardware


def test_flops_per_token_in_both_causal_conventions():
    """Counted by hand, so a changed formula or parameter count shows up as a number."""
    config = ModelConfig(
        vocab_size=100, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=16, max_seq_len=32
    )
    tokens = jax.numpy.zeros((1, 4), jax.numpy.int32)
    params = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"]
    # Per layer: q, k, v, out kernels 4·8·8 = 256 + biases 3·8 + 8 = 32; MLP kernels 2·8·16 = 256
    # + biases 16 + 8 = 24; two LayerNorms 2·(8 + 8) = 32. Total 600, x 2 layers = 1,200.
    # Plus the tied token embedding (it is the output matmul) 100·8 = 800 and the final norm 16;
    # the 32·8 learned position table is a lookup and does not count. N = 2,016, 6N = 12,096.
    six_n = 12_096
    attention = 12 * 2 * 2 * 4 * 32  # 12 · layers · heads · head_dim · context = 6,144
    assert train_flops_per_token(config, params, 32) == six_n + attention == 18_240
    halved = train_flops_per_token(config, params, 32, causal_discount=True)
    assert halved == six_n + attention // 2 == 15_168


def fake_device(monkeypatch, kind, measured=1.5e12):
    """Pretend the first device is `kind`; the "measured" peak is a constant, nothing is timed."""
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
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
    assert source.startswith("measured: 2048^3 float32 matmul, 1.5 TFLOP/s")
