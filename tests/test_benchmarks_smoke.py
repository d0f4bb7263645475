"""benchmarks/accelerator.py end to end on CPU with tiny shapes (--cpu_smoke), so that the
script works the first time it meets a GPU: a train row (with its batch search) and
decode rows with bf16 and int8 weights and KV caches."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_cpu_smoke(tmp_path):
    output = tmp_path / "accelerator.json"
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as one GPU
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
