"""Every ```bash block of README.md runs, shrunk to seconds, or says why it cannot.

A block whose first line is `# not run in tests: <why>` is skipped; every other
block runs as one bash script (cwd: the repository) after two rewrites: paths under
/tmp/ and the example corpus/ go to a temporary directory, and each command gets
the flags of its row in SHRINK (fewer steps, a smaller model). A command without
a row fails the test, so a new README command cannot go untested. Blocks that
share a /tmp/ path run in README order in one chain (training before sampling);
chains run two at a time, the longest first (the other thread runs the rest meanwhile),
sharing one XLA compilation cache.
"""

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

from tests.test_train_loop import REPO, SMALL

README = os.path.join(REPO, "README.md")
NOT_RUN = "# not run in tests:"

# The default config shrunk (test_train_loop.py's SMALL), for two steps with one evaluation.
TRAIN_OVERRIDES = {
    **SMALL,
    "model.num_kv_heads": 0,  # = num_heads: the Llama presets' 8 KV heads need 8 heads
    "train.num_steps": 2,
    "train.num_microbatches": 1,
    "train.eval_every": 2,
    "checkpoint.every_steps": 2,
    "data.eval_max_batches": 1,
}
_TRAIN = " ".join(f"--config.{key}={value}" for key, value in TRAIN_OVERRIDES.items())

# Command prefix (after any VAR=value settings) -> (flags appended, {text: replacement}).
# The longest matching prefix wins; flags given last override the README's own.
SHRINK = {
    "python train.py": (_TRAIN, {}),
    "python train.py --workdir=/tmp/meshlm --config.train.num_steps=": (
        _TRAIN + " --config.train.num_steps=4",  # 2 more steps than the first run's
        {},
    ),
    "python -m configs.base": ("", {}),
    "python -m data.tokenizer": ("--vocab_size=300", {}),
    "python -m data.prepare": ("", {}),
    "python sample.py": ("--max_new_tokens=4", {}),
    "python sweep.py --config=": (
        "",
        {"configs/default.py": "{tmp}/small.py", "configs/sweeps/lr.py": "{tmp}/one_trial.py"},
    ),
    "python sweep.py --summarize=": ("", {}),
    "python eval.py": ("", {}),
    "python compress.py": ("", {}),
    "python benchmarks/attention.py": ("--lengths=64 --steps=1", {}),
}

# A sweep of one trial on the default config shrunk like _TRAIN.
SMALL_CONFIG = f"""
from configs.default import get_config as default_config
from training.sweeps import apply_overrides

def get_config():
    return apply_overrides(default_config(), {TRAIN_OVERRIDES!r})
"""
ONE_TRIAL = "def get_sweep():\n    return [{'optimizer.learning_rate': 0.002}]\n"


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block."""
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S)
    ]


def commands(body: str) -> list[str]:
    """The block's commands: continuation lines joined, comments (which would swallow the
    appended flags) and blank lines dropped."""
    joined = body.replace("\\\n", " ")
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def shrunk(command: str, tmp: str, line: int) -> str:
    """The command with its SHRINK row's flags and replacements, paths moved into `tmp`."""
    program = re.sub(r"^(\w+=\S+\s+)*", "", command)
    rows = [prefix for prefix in SHRINK if program.startswith(prefix)]
    if not rows:
        pytest.fail(
            f"README.md:{line}: no row in SHRINK ({__file__}) for `{command[:60]}`: add one "
            f"(command prefix -> flags that make it take seconds), or make `{NOT_RUN} <why>` "
            "the block's first line."
        )
    flags, replacements = SHRINK[max(rows, key=len)]
    for old, new in replacements.items():
        command = command.replace(old, new)
    command = re.sub(r"(?<![\w/])/tmp/", "{tmp}/", command)
    command = re.sub(r"(?<![\w/])corpus/", "{tmp}/corpus/", command)
    return f"{command} {flags}".replace("{tmp}", tmp)


def chains(blocks: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Blocks grouped so that those naming a common /tmp/ path stay together, in order."""
    groups: list[tuple[set, list]] = []
    for block in blocks:
        paths = set(re.findall(r"/tmp/[\w.-]+", block[1]))
        joined = [g for g in groups if g[0] & paths]
        merged = (
            paths.union(*(g[0] for g in joined)),
            sorted(sum((g[1] for g in joined), [block])),
        )
        groups = [g for g in groups if g not in joined] + [merged]
    return [members for _, members in groups]


def write_inputs(tmp: str) -> None:
    """The example corpus (paragraphs of code-like text) and the shrunk sweep."""
    paragraphs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    os.makedirs(os.path.join(tmp, "corpus", "train"))
    os.makedirs(os.path.join(tmp, "corpus", "valid"))
    for shard in range(2):
        with open(os.path.join(tmp, "corpus", "train", f"{shard}.txt"), "w") as f:
            f.write("\n\n".join(paragraphs[shard::2]))
    for name in ("valid.txt", "valid/0.txt"):
        with open(os.path.join(tmp, "corpus", name), "w") as f:
            f.write("\n\n".join(paragraphs[:60]))
    with open(os.path.join(tmp, "small.py"), "w") as f:
        f.write(SMALL_CONFIG)
    with open(os.path.join(tmp, "one_trial.py"), "w") as f:
        f.write(ONE_TRIAL)


def run_chain(chain: list[tuple[int, str]], tmp: str) -> list[str]:
    """Runs the chain's blocks in order; a failure message per failed block (then stops)."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    for line, body in chain:
        script = "\n".join(shrunk(c, tmp, line) for c in commands(body))
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            return [f"README.md:{line} failed (exit {result.returncode}):\n{script}\n{output}"]
    return []


def runnable_blocks() -> list[tuple[int, str]]:
    with open(README) as f:
        blocks = bash_blocks(f.read())
    assert blocks, "README.md has no ```bash blocks"
    return [(line, body) for line, body in blocks if not body.startswith(NOT_RUN)]


def test_every_readme_command_has_a_shrink_rule(tmp_path):
    for line, body in runnable_blocks():
        for command in commands(body):
            shrunk(command, str(tmp_path), line)  # fails naming the command without a row


def test_readme_commands_run(tmp_path):
    tmp = str(tmp_path)
    write_inputs(tmp)
    longest_first = sorted(
        chains(runnable_blocks()), key=lambda c: sum(len(commands(b)) for _, b in c), reverse=True
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failures = sum(pool.map(lambda c: run_chain(c, tmp), longest_first), [])
    assert not failures, "\n\n".join(failures)


def layout_entries(text: str) -> dict[str, str]:
    """README's Layout block as {first word: its text}: an entry starts at column 0 and
    goes on over the indented lines below it."""
    block = re.search(r"^## Layout\n+```\n(.*?)^```", text, re.M | re.S)
    assert block, "README.md has no ## Layout code block"
    entries: dict[str, str] = {}
    name = ""
    for line in block.group(1).splitlines():
        if line[:1].strip():
            name, _, line = line.partition(" ")
            entries[name] = ""
        entries[name] += " " + line
    return entries


def python_modules() -> list[str]:
    """Every Python module of the repository (relative paths), tests and packages'
    __init__.py aside."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        found += [
            os.path.relpath(os.path.join(folder, f), REPO)
            for f in files
            if f.endswith(".py") and f != "__init__.py"
        ]
    return sorted(found)


def test_readme_layout_names_every_module():
    """A module missing from README's Layout is a part of the house a newcomer cannot find."""
    with open(README) as f:
        entries = layout_entries(f.read())
    missing = []
    for path in python_modules():
        top, _, rest = path.partition(os.sep)
        if not rest:  # a top-level script: its own entry
            if top not in entries:
                missing.append(path)
        elif not re.search(rf"(?<![\w.]){re.escape(rest)}\b", entries.get(top + "/", "")):
            missing.append(path)
    assert not missing, f"README.md's Layout does not name: {', '.join(missing)}"
