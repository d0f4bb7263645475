"""sample.py on a trained workdir: the text it prints, and its errors."""

import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from data.hf_tokenizer import load_tokenizer
from model.sampler import SamplingConfig, load_sampler
from tests.test_train_loop import REPO, small_config
from training import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for a few steps of the shrunk default config."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    loop.train(small_config(**{"train.num_steps": 4, "train.eval_every": 0}), workdir)
    return workdir


def sample(*flags):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "sample.py"), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_sample_prints_what_the_sampler_generates(trained):
    prompts = ["import os", "def main(x):"]
    result = sample(
        f"--workdir={trained}",
        *(f"--prompt={p}" for p in prompts),
        "--max_new_tokens=6",
        "--temperature=0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sampler, config = load_sampler(trained, mesh, devices=jax.devices()[:1])
    tokenizer = load_tokenizer(config.data.tokenizer)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    new = sampler.generate([tokenizer.encode(p) for p in prompts], greedy, tokenizer.eos_id)
    expected = "".join(
        f"--- sample {i}/2 ({len(n)} new tokens) ---\n{p + tokenizer.decode(n)}\n"
        for i, (p, n) in enumerate(zip(prompts, new), 1)
    )
    assert result.stdout == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "error: .*no checkpoint"),
        (["--prompt=x", "--top_p=1.5"], r"error: sampling.top_p=1.5: must be in \(0, 1\]"),
        (["--prompt=x", "--temperature=-1"], r"error: sampling.temperature=-1.0"),
        (["--prompt=x", "--mesh=1,2"], r"error: --mesh='1,2': give three sizes"),
    ],
)
def test_mistakes_get_one_error_line(tmp_path, flags, message):
    result = sample(f"--workdir={tmp_path}", *(flags or ["--prompt=x"]))
    assert result.returncode != 0
    assert re.search(message, result.stderr.strip().splitlines()[-1])


def test_a_prompt_longer_than_the_model_is_named(trained):
    result = sample(f"--workdir={trained}", "--prompt=" + "x " * 200, "--max_new_tokens=4")
    assert result.returncode != 0
    assert "prompt 1 has" in result.stderr and "--truncate_prompt" in result.stderr
    result = sample(
        f"--workdir={trained}", "--prompt=" + "x " * 200, "--max_new_tokens=4", "--truncate_prompt"
    )
    assert result.returncode == 0, result.stderr[-2000:]
