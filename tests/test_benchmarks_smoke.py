"""Benchmarks run small, so that they keep working: benchmarks/accelerator.py end to end on
CPU with tiny shapes (--cpu_smoke), so that the script works the first time it meets a GPU
(a train row with its batch search, decode rows with bf16 and int8 weights and KV caches);
the encoder-decoder benchmark's train steps; vs_pytorch.py's step mode."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_cpu_smoke(tmp_path):
    output = tmp_path / "accelerator.json"
    # One CPU device, as one GPU; compiled unoptimized, as the tests compile (conftest.py).
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/accelerator.py",
            "--cpu_smoke",
            "--models=llama_1b",  # the others differ only in their config file's shapes
            "--attention=xla,cudnn",  # cudnn: left out off NVIDIA GPUs
            "--decode_variants=none:model,int8:int8",
            f"--output={output}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert list(results["train"]) == ["llama_1b:xla"]
    row = results["train"]["llama_1b:xla"]
    assert "error" not in row, row
    assert row["batch"] == 2  # the largest power of two up to --cpu_smoke's cap that fits
    assert row["step_s"] > 0 and 0 < row["mfu"] and row["estimate_bytes"] > 0
    rows = results["decode"]["llama_1b"]
    assert [(r["weights"], r["kv_cache"]) for r in rows] == [("none", "model"), ("int8", "int8")]
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert "llama_1b:xla" in done.stdout and "int8 weights, int8 KV" in done.stdout


def test_encoder_decoder_benchmark_cpu_smoke():
    """benchmarks/encoder_decoder.py's real train steps at tiny widths: one row per model,
    both reading the same enc_len + dec_len tokens per row."""
    tiny = "vocab_size=64 embed_dim=32 num_heads=2 mlp_dim=64 scan_unroll=1".split()
    done = subprocess.run(
        [sys.executable, "benchmarks/encoder_decoder.py", "--enc_len=12", "--dec_len=4",
         "--batch=2", "--steps=1", "--warmup=0", "--encoder_layers=1", "--decoder_layers=1",
         "--decoder_only_layers=2", *(f"--config.model.{field}" for field in tiny)],
        cwd=REPO, env=dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0"),
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["enc_len"], r["dec_len"]) for r in rows] == [
        ("encoder-decoder", 12, 4), ("decoder-only", 0, 16)]
    assert rows[0]["params"] > rows[1]["params"]  # its own embedding and cross-attention
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "| encoder-decoder | 1 enc + 1 dec |" in done.stdout


def test_vs_pytorch_benchmark_smoke():
    """benchmarks/vs_pytorch.py's step mode at the baby-GPT shapes with --breakdown: the
    PyTorch reference has exactly meshlm's parameter count, and every side is timed, meshlm
    on one CPU device and on two (data parallel), and the MLP's matmuls alone."""
    done = subprocess.run(
        [sys.executable, "benchmarks/vs_pytorch.py", "--shapes=baby", "--steps=2",
         "--warmup=1", "--breakdown", "--cpu_devices=2", "--profile"],
        cwd=REPO, env=dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0"),
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout.splitlines()[-1])["shapes"]
    assert row["params"] == row["torch_params"] == 804_096
    times = ("meshlm", "meshlm_data_parallel", "torch", "meshlm_forward", "meshlm_forward_backward",
             "torch_forward", "torch_forward_backward")
    assert all(row[f"{name}_ms"] > 0 for name in times)
    assert row["devices"] == 2
    for name in ("meshlm_profile", "meshlm_data_parallel_profile"):  # the step's own ops found
        assert row[name]["op_ms"] > 0 and row[name]["by_kind"], row[name]
    # The data-parallel gradients are summed across the 2 devices; one device has no all-reduce.
    assert "all-reduce" in row["meshlm_data_parallel_profile"]["by_kind"]
    assert "all-reduce" not in row["meshlm_profile"]["by_kind"]
    assert "forward + backward" in done.stdout and "on 2 CPU devices" in done.stdout
    from benchmarks.vs_pytorch import MATMULS

    assert all(row[f"{side}_{name}_ms"] > 0 for side in ("meshlm", "torch") for name, *_ in MATMULS)
    assert "one matmul over the batch's tokens, ms: mlp_in " in done.stdout


def test_vs_pytorch_matmuls_compute_the_same_products_on_both_sides(monkeypatch):
    """--breakdown's matmuls: meshlm's (model/layers.dot; its kernel gradient, whose
    transposes sit behind optimization barriers) and PyTorch's (nn.Linear's forms) are the
    same products, DOTS_PER_CALL of each, so their times compare."""
    import types

    import jax
    import numpy as np

    from benchmarks.vs_pytorch import DOTS_PER_CALL, MATMULS, matmul_calls
    from model import layers

    traced = []
    matmul, barrier = layers.matmul, jax.lax.optimization_barrier
    monkeypatch.setattr(layers, "matmul", lambda *a: traced.append("dot") or matmul(*a))
    monkeypatch.setattr(jax.lax, "optimization_barrier",
                        lambda x: traced.append("barrier") or barrier(x))
    calls = matmul_calls(types.SimpleNamespace(embed_dim=8, mlp_dim=24), tokens=40)
    for name, _, _, gradient in MATMULS:
        traced.clear()
        meshlm, reference = calls[f"meshlm_{name}"](), calls[f"torch_{name}"]()
        assert len(meshlm) == len(reference) == DOTS_PER_CALL
        assert traced.count("dot") >= DOTS_PER_CALL and ("barrier" in traced) == gradient
        for ours, theirs in zip(meshlm, reference, strict=True):
            theirs = theirs.numpy().T if gradient else theirs.numpy()  # a kernel is [in, out]
            np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-4)


def test_vs_pytorch_loop_seconds_weights_each_report_by_its_steps():
    from benchmarks.vs_pytorch_whole_run import loop_seconds

    records = [
        {"step": 10, "step_time": 0.5},
        {"step": 10, "eval_loss": 3.0},  # not a step report
        {"step": 30, "step_time": 0.25},
        {"step": 35, "step_time": 1.0},
    ]
    assert loop_seconds(records) == 10 * 0.5 + 20 * 0.25 + 5 * 1.0


def test_cpu_model_tells_apart_cpus_a_cloud_names_alike(tmp_path, monkeypatch):
    from benchmarks import machine_info

    monkeypatch.setattr(machine_info.platform, "processor", lambda: "")  # as on Linux
    monkeypatch.setattr(machine_info.platform, "machine", lambda: "aarch64")

    def cpuinfo(name: str, first: str, second: str = "") -> str:
        path = tmp_path / name
        path.write_text(f"processor\t: 0\n{first}\n\nprocessor\t: 1\n{second or first}\n")
        return str(path)

    def x86(model: str, flags: str) -> str:
        return (
            f"cpu family\t: 6\nmodel\t\t: {model}\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            f"flags\t\t: fpu sse2 {flags}"
        )

    newer = machine_info.cpu_model(cpuinfo("newer", x86("207", "avx2 avx512f")))
    older = machine_info.cpu_model(cpuinfo("older", x86("85", "avx2"), x86("1", "")))
    assert newer == "Intel(R) Xeon(R) Processor (family 6, model 207, AVX-512)"
    assert older == "Intel(R) Xeon(R) Processor (family 6, model 85, AVX2)"  # the first CPU's
    arm = cpuinfo("arm", "BogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU part\t: 0xd40")
    assert machine_info.cpu_model(arm) == "aarch64 (implementer 0x41, part 0xd40)"
    assert machine_info.cpu_model(str(tmp_path / "missing")) == "aarch64"  # platform's answer
