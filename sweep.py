"""Hyperparameter sweeps: run, dispatch or summarize the trials of a sweep file.

    python sweep.py --config=configs/default.py --sweep=configs/sweeps/lr.py --workdir=W
    python sweep.py ... --config.train.num_steps=300  # base overrides, before each trial's own
    python sweep.py ... --parallel=2                  # two trials at a time
    python sweep.py ... --vectorized                  # all trials as one jitted program
    python sweep.py ... --dispatch=slurm --script=W/submit.sh   # commands, not runs
    python sweep.py --summarize=W                     # W/summary.{csv,md,png}

Each trial runs as its own `python train.py` process in W/<name from its overrides>:
a crash, a NaN or a bad override ends that process only, and is recorded in the
trial's status.json while the sweep goes on. Rerunning skips finished trials, and
train.py resumes an interrupted one from its last checkpoint. The base config takes
train.py's `--config.<field>=<value>` overrides; sweep.json records them, and a rerun
with other ones is refused (its finished trials ran without them).
"""

import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

import startup

startup.quiet_start()  # before JAX is imported (loading --config imports it)

from absl import flags  # noqa: E402
from ml_collections.config_flags import config_flags  # noqa: E402

from errors import UserError  # noqa: E402
from training import sweeps  # noqa: E402
from training.sweep_summary import summarize  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "train.py")

_CONFIG = startup.define_config_flag(
    "The base config file; override its fields with --config.<field>=<value>, as in train.py."
)
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


def base_overrides() -> dict:
    """The --config.<field>=<value> overrides given, in order: each trial starts from them."""
    return dict(config_flags.get_override_values(flags.FLAGS["config"]))


def config_file(distributed=False) -> str:
    """The --config file for train.py: absolute here (trials run in the repository), relative
    to the repository for dispatch (it runs in --remote_dir on other machines)."""
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if not distributed:
        return os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def train_command(config_path: str, trial_dir: str, overrides: dict, distributed=False) -> list:
    """train.py's argv for one trial; `overrides` are the base's then the trial's."""
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
        base = base_overrides()
        with_base = {name: {**base, **overrides} for name, overrides in named.items()}
        if not (_DISPATCH.value and "://" in _WORKDIR.value):  # dispatch needs no bucket access
            sweeps.write_sweep(_WORKDIR.value, named, base)
        if _DISPATCH.value:
            config_path = config_file(distributed=True)
            commands = dispatch_commands(_DISPATCH.value, config_path, _WORKDIR.value, with_base)
            if _SCRIPT.value:
                with open(_SCRIPT.value, "w") as f:
                    f.write("#!/bin/bash\n" + "\n".join(commands) + "\n")
                os.chmod(_SCRIPT.value, 0o755)
                print(f"wrote {len(commands)} commands to {_SCRIPT.value}")
            else:
                print("\n".join(commands))
            return
        if _VECTORIZED.value:
            startup.quiet_start(tensorflow=True)  # before TensorFlow is imported
            from training import vectorized  # imports TensorFlow, which other modes do not need

            vectorized.run(_CONFIG.value, _WORKDIR.value, named)  # the base overrides applied
        else:
            run_sequential(config_file(), _WORKDIR.value, with_base, _PARALLEL.value)
        for line in summarize(_WORKDIR.value):
            print(line)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    startup.run(main)
