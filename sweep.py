"""Hyperparameter sweeps: run, dispatch or summarize the trials of a sweep file.

    python sweep.py --config=configs/default.py --sweep=configs/sweeps/lr.py --workdir=W
    python sweep.py ... --parallel=2                  # two trials at a time
    python sweep.py ... --vectorized                  # all trials as one jitted program
    python sweep.py ... --dispatch=slurm --script=W/submit.sh   # commands, not runs
    python sweep.py --summarize=W                     # W/summary.{csv,md,png}

Each trial runs as its own `python train.py` process in W/<name from its overrides>:
a crash, a NaN or a bad override ends that process only, and is recorded in the
trial's status.json while the sweep goes on. Rerunning skips finished trials, and
train.py resumes an interrupted one from its last checkpoint.
"""

import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from absl import app, flags

import startup
from errors import UserError
from training import sweeps
from training.sweep_summary import summarize

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "train.py")

_CONFIG = flags.DEFINE_string("config", "configs/default.py", "The base config file.")
_SWEEP = flags.DEFINE_string("sweep", None, "A sweep file whose get_sweep() lists the trials.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: one subdirectory a trial.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at a time (sequential mode).")
_VECTORIZED = flags.DEFINE_bool(
    "vectorized",
    False,
    "Train all trials as one jitted program, stacked on a trial axis; only for fields that "
    "keep shapes (learning rate, warmup, weight decay, Adam's b1/b2/eps, seed).",
)
_DISPATCH = flags.DEFINE_enum(
    "dispatch", None, ["tpu_vm", "slurm"], "Print one command per trial instead of running it."
)
_SCRIPT = flags.DEFINE_string("script", None, "With --dispatch: write the commands to this file.")
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "With --dispatch=tpu_vm: the TPU VM's name.")
_REMOTE_DIR = flags.DEFINE_string(
    "remote_dir", "meshlm", "With --dispatch: the repository's directory on the machines."
)
_DISPATCH_ARGS = flags.DEFINE_string(
    "dispatch_args", "", "Extra arguments for gcloud or sbatch, e.g. '--zone=us-central2-b'."
)
_SUMMARIZE = flags.DEFINE_string("summarize", None, "Summarize the sweep in this workdir; exit.")


def train_command(config_path: str, trial_dir: str, overrides: dict, distributed=False) -> list:
    """train.py's argv for one trial."""
    return [
        "python" if distributed else sys.executable,
        "train.py" if distributed else TRAIN,
        *(["--distributed"] if distributed else []),
        f"--workdir={trial_dir}",
        f"--config={config_path}",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]


def finished(trial_dir: str) -> bool:
    """Whether metrics.jsonl reached the trial's train.num_steps (read from its config.json)."""
    config = sweeps.read_trial_config(trial_dir)
    records = sweeps.read_metrics(trial_dir)
    return bool(config and records) and records[-1]["step"] >= config["train"]["num_steps"]


def run_trial(config_path: str, trial_dir: str, overrides: dict) -> str:
    """Runs (or resumes) one trial in its own process; returns and records its status."""
    if sweeps.read_status(trial_dir)["status"] == "done":
        print(f"skipped (done): {trial_dir}", flush=True)
        return "done"
    print(f"running: {trial_dir}", flush=True)
    command = train_command(config_path, trial_dir, overrides)
    returncode, error = sweeps.run_logged(command, trial_dir, cwd=REPO)
    if returncode:
        status = "failed"
    else:  # exit 0 before the last step: preempted (SIGTERM), resumable
        status, error = ("done", "") if finished(trial_dir) else ("interrupted", "")
    sweeps.write_status(trial_dir, status, error)
    print(f"{status}: {trial_dir} {error}", flush=True)
    return status


def run_sequential(config_path: str, workdir: str, named: dict, parallel: int) -> dict:
    """{name: status}, running `parallel` trials at a time."""
    if parallel < 1:
        raise UserError(f"--parallel={parallel}: must be at least 1.")
    with ThreadPoolExecutor(parallel) as pool:
        futures = {
            name: pool.submit(run_trial, config_path, os.path.join(workdir, name), overrides)
            for name, overrides in named.items()
        }
    return {name: future.result() for name, future in futures.items()}


def dispatch_commands(kind: str, config_path: str, workdir: str, named: dict) -> list[str]:
    """One shell command per trial: for a TPU VM (all workers) or a SLURM cluster."""
    if kind == "tpu_vm" and not _TPU_NAME.value:
        raise UserError("--dispatch=tpu_vm needs --tpu_name, the TPU VM to run on.")
    commands = []
    for name, overrides in named.items():
        trial_dir = f"{workdir.rstrip('/')}/{name}"
        train = shlex.join(train_command(config_path, trial_dir, overrides, distributed=True))
        remote_dir = shlex.quote(_REMOTE_DIR.value)
        if kind == "tpu_vm":
            command = (
                f"gcloud compute tpus tpu-vm ssh {shlex.quote(_TPU_NAME.value)} --worker=all "
                f"{_DISPATCH_ARGS.value} --command={shlex.quote(f'cd {remote_dir} && {train}')}"
            )
        else:
            command = (
                f"sbatch --job-name={shlex.quote('meshlm-' + name)} --chdir={remote_dir} "
                f"{_DISPATCH_ARGS.value} --wrap={shlex.quote('srun ' + train)}"
            )
        commands.append(" ".join(command.split()))
    return commands


def main(argv):
    del argv
    try:
        if _SUMMARIZE.value:
            for line in summarize(_SUMMARIZE.value):
                print(line)
            return
        if not _SWEEP.value or not _WORKDIR.value:
            raise UserError("--sweep and --workdir are required (or --summarize=W alone).")
        named = sweeps.name_trials(sweeps.load_sweep(_SWEEP.value), _SWEEP.value)
        if _DISPATCH.value:
            commands = dispatch_commands(_DISPATCH.value, _CONFIG.value, _WORKDIR.value, named)
            if _SCRIPT.value:
                with open(_SCRIPT.value, "w") as f:
                    f.write("#!/bin/bash\n" + "\n".join(commands) + "\n")
                os.chmod(_SCRIPT.value, 0o755)
                print(f"wrote {len(commands)} commands to {_SCRIPT.value}")
            else:
                print("\n".join(commands))
            if "://" not in _WORKDIR.value:  # so that --summarize can read the trials later
                sweeps.write_sweep(_WORKDIR.value, named)
            return
        sweeps.write_sweep(_WORKDIR.value, named)
        if _VECTORIZED.value:
            startup.quiet_start(tensorflow=True)  # before JAX and TensorFlow are imported
            from training import vectorized  # imports JAX, which the other modes do not need

            vectorized.run(sweeps.load_config(_CONFIG.value), _WORKDIR.value, named)
        else:
            run_sequential(_CONFIG.value, _WORKDIR.value, named, _PARALLEL.value)
        for line in summarize(_WORKDIR.value):
            print(line)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)
