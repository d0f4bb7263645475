"""Every field of configs/base.py, set to every kind of bad value that applies, is refused
before anything runs: non-zero exit, one line naming the field, no traceback, no checkpoint."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import train
from configs import default, gpt2_small, llama_1b, llama_8b
from configs.base import field_table, get_base_config
from config_schema import PATH_KINDS, number_allowed, specs
from tests.test_train_loop import REPO, SMALL, small_config
from training.config import SECTIONS, RunConfig


def _numbers_outside(allowed: str, default):
    """Zero, negatives, and the values just past every bound, that `allowed` excludes."""
    bounds = [float(x) for x in re.findall(r"-?[\d.]+(?:e-?\d+)?|inf", allowed) if x != "inf"]
    candidates = {0.0, -1.0}
    for b in bounds:
        candidates |= {b - 1, b, b + 1, b - 0.5, b + 0.5}
    kind = type(default)
    values = {kind(c) for c in candidates if kind is float or c == int(c)}
    return sorted(v for v in values if not number_allowed(allowed, v))


def bad_values(spec, default) -> list:
    """The bad values of each kind that apply to a field (wrong types: see the CLI test)."""
    allowed = spec.allowed
    if isinstance(allowed, tuple):
        return ["no-such-choice", ""]
    if allowed in (bool, str):
        return []
    if allowed == "file":
        return ["/no/such/file.model"]
    if allowed == "dir":
        return ["/no/such/directory"]
    if allowed == "text":
        return ["", "  "]
    if allowed == "globs":
        return ["", "/no/such/dir/*.txt"]
    return _numbers_outside(allowed, default)


def all_fields():
    """(section, field, spec, default) for every declared field of the base config."""
    for section, cls in [("", RunConfig), *SECTIONS.items()]:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, spec in specs(cls).items():
            yield section, name, spec, defaults[name]


CASES = [
    pytest.param(section, name, spec, value, id=f"{section or 'config'}.{name}={value!r}")
    for section, name, spec, default in all_fields()
    for value in bad_values(spec, default)
]


def test_every_base_field_is_declared_and_documented():
    config = get_base_config()
    declared = {f"{s}.{n}" if s else n for s, n, _, _ in all_fields()}
    in_config = {
        f"{k}.{f}" if isinstance(v, dict) else k
        for k, v in config.to_dict().items()
        for f in (v if isinstance(v, dict) else [None])
    }
    assert declared == in_config
    for name, _, allowed, doc in field_table():
        assert doc and allowed, name
    # Every field that has values to refuse gets at least one case below.
    refusable = {
        f"{s}.{n}" if s else n for s, n, spec, _ in all_fields() if spec.allowed not in (bool, str)
    }
    tested = {c.id.split("=")[0].removeprefix("config.") for c in CASES}
    assert refusable <= tested


@pytest.mark.parametrize("section, name, spec, value", CASES)
def test_a_bad_value_is_refused_with_one_line_naming_the_field(
    section, name, spec, value, tmp_path
):
    config = small_config()
    target = config[section] if section else config
    if spec.needed_if:  # e.g. data.train_files matters only with data.source=files
        other, _, wanted = spec.needed_if.partition("=")
        target[other] = wanted
        if wanted == "files":
            text = tmp_path / "text.txt"
            text.write_text("some text\n" * 100)
            target.update(train_files=str(text), eval_files=str(text))
        if wanted == "tfds":
            target.tfds_name = "lm1b"  # never loaded: the bad field stops the run first
    target[name] = value
    workdir = str(tmp_path / "workdir")
    with pytest.raises(SystemExit) as exit_info:
        train.run(config, workdir)
    message = str(exit_info.value.code)
    field_name = f"{section}.{name}" if section else name
    assert message.startswith("error: ") and field_name in message, message
    assert "\n" not in message
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("module", [default, gpt2_small, llama_1b, llama_8b])
def test_presets_declare_no_unknown_field_and_validate(module):
    from training.config import validate_config

    config = module.get_config()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    assert validate_config(config, num_devices=8).num_layers >= 1


@pytest.mark.parametrize(
    "flag, names",
    [
        ("--config.train.num_steps=abc", "config.train.num_steps"),  # wrong types: absl
        ("--config.optimizer.learning_rate=fast", "config.optimizer.learning_rate"),
        ("--config.model.use_bias=maybe", "config.model.use_bias"),
        ("--config.train.log_every=0", "train.log_every"),  # once a ZeroDivisionError
        ("--config.data.tokenizer=/no/such.model", "data.tokenizer"),
        ("--config.model.num_layer=3", 'Did you mean "num_layers"'),
        ("--config.mesh.data=3", "mesh.data=3"),
    ],
)
def test_the_command_line_refuses_bad_values_without_a_traceback(tmp_path, flag, names):
    workdir = tmp_path / "workdir"
    small = [f"--config.{k}={v}" for k, v in SMALL.items()]  # the bad flag comes last and wins
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *small, flag],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if names in line]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(workdir / "checkpoints")


def test_bad_sharding_rules_are_refused(tmp_path):
    config = small_config()
    config.sharding_rules = "vocab=tensor,nonsense"
    with pytest.raises(SystemExit, match=r"^error: sharding_rules="):
        train.run(config, str(tmp_path))


def test_path_kinds_are_all_exercised():
    kinds = {spec.allowed for _, _, spec, _ in all_fields() if spec.allowed in PATH_KINDS}
    assert kinds == set(PATH_KINDS)


@pytest.mark.parametrize("script", ["benchmarks/train_step.py", "benchmarks/checkpoint_save.py"])
def test_benchmarks_refuse_bad_values_without_a_traceback(script):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, script), "--config.model.num_heads=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: model.num_heads=0" in result.stderr
