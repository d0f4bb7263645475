"""A sweep's bookkeeping, shared by sweep.py's modes and its summary.

`<workdir>/sweep.json` lists the trials (name -> overrides) and the base config's
command-line overrides, which every trial starts from; each trial's own
directory `<workdir>/<name>/` holds train.py's config.json and metrics.jsonl plus
`status.json`: {"status": "done" | "failed" | "interrupted", "error": ...} and, for
trials run as processes, their output in `train.log`.
"""

import importlib.util
import json
import os
import re
import subprocess

from errors import UserError
from paths import workdir_path

SWEEP_FILE = "sweep.json"
STATUS_FILE = "status.json"
LOG_FILE = "train.log"


def _load(flag: str, path: str, function: str):
    """Calls `function()` of the Python file `path` (a config or a sweep file)."""
    if not os.path.isfile(path):
        raise UserError(f"--{flag}={path}: no such file.")
    spec = importlib.util.spec_from_file_location(f"{flag}_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise UserError(f"--{flag}={path}: defines no {function}().")
    return getattr(module, function)()


def load_sweep(path: str) -> list[dict]:
    """The trials of a sweep file: `get_sweep()` -> a non-empty list of override dicts."""
    trials = _load("sweep", path, "get_sweep")
    if not trials or not all(isinstance(t, dict) and t for t in trials):
        raise UserError(f"--sweep={path}: get_sweep() must return a non-empty list of dicts.")
    return trials


def trial_name(overrides: dict) -> str:
    """A directory name from the overrides' last field names and values: learning_rate=0.001,..."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def name_trials(trials: list[dict], sweep_path: str) -> dict[str, dict]:
    """{name: overrides}; two trials with one name would share a directory, so that is an error."""
    named = {trial_name(t): t for t in trials}
    if len(named) != len(trials):
        raise UserError(f"--sweep={sweep_path}: some trials repeat the same overrides.")
    return named


def apply_overrides(config, overrides: dict):
    """A copy of `config` with `{"section.field": value}` set, like --config.section.field=value."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        if field not in node:
            raise UserError(f"sweep override {key}={value!r}: the config has no field {key}.")
        node[field] = value
    return config


def write_sweep(workdir: str, named: dict[str, dict], base_overrides: dict | None = None) -> None:
    """Writes sweep.json; refuses a rerun whose base overrides differ from the recorded ones
    (the finished trials, which a rerun skips, ran with those)."""
    path = workdir_path(workdir) / SWEEP_FILE
    base = json.loads(json.dumps(base_overrides or {}))  # tuples as lists, as read back
    if path.is_file():
        recorded = json.loads(path.read_text()).get("base_overrides", {})
        if recorded != base:
            raise UserError(
                f"{path}: the sweep ran with {_as_flags(recorded)}, this rerun gives "
                f"{_as_flags(base)}; give the same --config.* overrides, or a new --workdir."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base_overrides": base, "trials": named}, indent=2))


def _as_flags(overrides: dict) -> str:
    flags = " ".join(f"--config.{key}={value}" for key, value in overrides.items())
    return flags or "no base overrides"


def read_sweep(workdir: str) -> dict[str, dict]:
    path = workdir_path(workdir) / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"--summarize={workdir}: no {SWEEP_FILE}; is this a sweep's workdir?")
    return json.loads(path.read_text())["trials"]


def write_status(trial_dir: str, status: str, error: str = "") -> None:
    trial_dir = workdir_path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / STATUS_FILE).write_text(json.dumps({"status": status, "error": error}))


def read_status(trial_dir: str) -> dict:
    """{"status", "error"}; "pending" if the trial never started."""
    path = workdir_path(trial_dir) / STATUS_FILE
    if not path.is_file():
        return {"status": "pending", "error": ""}
    return json.loads(path.read_text())


def read_trial_config(trial_dir: str) -> dict | None:
    """The trial's config.json (written by train.py before its first step), or None."""
    path = workdir_path(trial_dir) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_metrics(trial_dir: str) -> list[dict]:
    """metrics.jsonl's records; a resumed run logs some steps again, the later record wins."""
    path = workdir_path(trial_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = {}
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            kind = "eval" if "eval_loss" in record else "train"
            records.setdefault((record["step"], kind), {}).update(record)
    return [records[key] for key in sorted(records)]


def run_logged(command: list[str], trial_dir: str, cwd: str) -> tuple[int, str]:
    """Runs `command` with its output appended to `<trial_dir>/train.log`; returns its exit
    code and, if not 0, its last `error: ...` line (else its last line) with the code."""
    trial_dir = workdir_path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = trial_dir / LOG_FILE
    with log_path.open("a") as log:
        if "://" not in str(log_path):  # a local file: the process writes to it directly
            returncode = subprocess.run(
                command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        else:  # e.g. gs://: copied through a pipe, uploaded when the file is closed
            with subprocess.Popen(
                command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ) as process:
                log.writelines(process.stdout)
            returncode = process.returncode
    if not returncode:
        return 0, ""
    text = log_path.read_bytes().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return returncode, f"{last} (exit code {returncode})"
