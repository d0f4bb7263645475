"""Two local processes under JAX's distributed runtime (4 CPU devices each, gloo collectives):
a SIGTERM sent to one of them brings both to the same saved step."""

import os
import re
import signal
import socket
import subprocess
import sys

from tests.test_train_loop import REPO, SMALL, checkpoint_steps, read_metrics, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(workdir, num_processes=2, extra_env=None, **overrides):
    """train.py on `num_processes` local processes; `extra_env[i]` adds to process i's env."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    extra_env = extra_env or {}
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    address = f"127.0.0.1:{free_port()}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "train.py"),
                f"--workdir={workdir}",
                "--distributed",
                f"--coordinator_address={address}",
                f"--num_processes={num_processes}",
                f"--process_id={index}",
                *flags,
            ],
            cwd=REPO,
            env={**env, **extra_env.get(index, {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(num_processes)
    ]


def successful_outputs(processes, timeout=300) -> list[str]:
    """Every process's output once all have exited 0 (each is killed if anything fails)."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {index}:\n{output[-3000:]}"
    return outputs


def test_sigterm_to_one_process_saves_the_same_step_on_all(tmp_path):
    workdir = str(tmp_path)
    processes = start_processes(
        workdir,
        **{"train.num_steps": 100000, "checkpoint.every_steps": 0, "train.eval_every": 0},
    )
    try:
        wait_for(
            lambda: (
                os.path.exists(os.path.join(workdir, "metrics.jsonl"))
                and len(read_metrics(workdir)) >= 3
            ),
            processes[0],
            timeout=300,
        )
        processes[1].send_signal(signal.SIGTERM)  # only the second process is told
        outputs = successful_outputs(processes)
    finally:
        for p in processes:
            p.kill()
    saved = [
        int(re.search(r"Preempted at step (\d+): checkpoint saved", o).group(1)) for o in outputs
    ]
    assert saved[0] == saved[1], saved
    assert checkpoint_steps(workdir) == [saved[0]]
    assert max(read_metrics(workdir)) == saved[0]


# Loaded by Python at start-up from PYTHONPATH: this process cannot read one checkpoint step.
FAILING_READ = """
import orbax.checkpoint as ocp

_restore = ocp.JsonCheckpointHandler.restore


def restore(self, directory, *args, **kwargs):
    if str(directory).endswith("/{step}/meta"):
        raise OSError("simulated read error on this host only")
    return _restore(self, directory, *args, **kwargs)


ocp.JsonCheckpointHandler.restore = restore
"""


def test_a_read_error_on_one_process_sets_the_step_aside_on_all(tmp_path):
    workdir = str(tmp_path / "workdir")
    short = {"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0}
    for process in start_processes(workdir, **short):
        assert process.wait(timeout=300) == 0, process.communicate()[0][-3000:]
    assert checkpoint_steps(workdir) == [3, 6]

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_READ.format(step=6))
    processes = start_processes(
        workdir, extra_env={1: {"PYTHONPATH": str(hook)}}, **{**short, "train.num_steps": 8}
    )
    for index, output in enumerate(successful_outputs(processes)):
        assert "Restored checkpoint at step 3" in output, f"process {index}"
    set_aside = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    assert [name.split("-")[0] for name in set_aside] == ["6"]
    assert checkpoint_steps(workdir) == [3, 6, 8]  # step 6 trained again from step 3
