"""sample.py on a trained workdir: the text it prints, and its errors."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from checkpoints.read import load_params, newest_step_meta
from data.hf_tokenizer import load_tokenizer
from model import ModelConfig, Transformer
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
    step, meta = newest_step_meta(trained)
    tokenizer = load_tokenizer(meta["config"]["data"]["tokenizer"])
    new = greedy_by_full_passes(trained, step, meta, [tokenizer.encode(p) for p in prompts], 6)
    expected = "".join(
        f"--- sample {i}/2 ({len(n)} new tokens) ---\n{p + tokenizer.decode(n)}\n"
        for i, (p, n) in enumerate(zip(prompts, new), 1)
    )
    assert result.stdout == expected


def test_an_int8_kv_cache_samples_and_a_bad_cache_dtype_is_named(trained):
    result = sample(
        f"--workdir={trained}",
        "--prompt=import os",
        "--max_new_tokens=4",
        "--temperature=0",
        "--kv_cache_dtype=int8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    step, meta = newest_step_meta(trained)
    tokenizer = load_tokenizer(meta["config"]["data"]["tokenizer"])
    # The float model's margins here (>= 0.25) dwarf the int8 cache's logit error (~4e-4).
    [new] = greedy_by_full_passes(trained, step, meta, [tokenizer.encode("import os")], 4)
    assert result.stdout == f"--- sample 1/1 (4 new tokens) ---\nimport os{tokenizer.decode(new)}\n"
    result = sample(f"--workdir={trained}", "--prompt=x", "--kv_cache_dtype=fp8")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: sampling.kv_cache_dtype='fp8': must be one of model, int8."


def greedy_by_full_passes(workdir, step, meta, prompts, num_new):
    """Greedy continuations computed without the sampler or its loader (which sample.py
    uses): the step's params read onto one device, one full forward pass per new token."""
    model = Transformer(ModelConfig.from_dict(meta["config"]["model"]))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), shapes)
    params = load_params(workdir, step, abstract)
    tokenizer = load_tokenizer(meta["config"]["data"]["tokenizer"])
    apply = jax.jit(model.apply)
    outputs = []
    for ids in prompts:
        new = []
        while len(new) < num_new and tokenizer.eos_id not in new:
            logits = apply({"params": params}, jnp.asarray([ids + new], jnp.int32))
            new.append(int(jnp.argmax(logits[0, -1, : tokenizer.vocab_size])))
        outputs.append(new)
    return outputs


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "error: .*no checkpoint"),
        (["--prompt=x", "--top_p=1.5"], r"error: sampling.top_p=1.5: must be in \(0, 1\]"),
        (["--prompt=x", "--temperature=-1"], r"error: sampling.temperature=-1.0"),
        (["--prompt=x", "--mesh=1,2"], r"error: --mesh='1,2': give sizes data,fsdp,tensor\["),
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
