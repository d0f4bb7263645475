"""Two local processes under JAX's distributed runtime (4 CPU devices each, gloo collectives),
started as tools/launch_local.py starts them: they train as one process of 8 devices does,
their checkpoints restore on another topology, and a SIGTERM sent to one of them brings
both to the same saved step."""

import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from errors import UserError
from tests.test_train_loop import (
    REPO,
    SMALL,
    checkpoint_steps,
    read_metrics,
    small_config,
    wait_for,
)
from tools.launch_local import free_port, process_commands, process_env
from training import distributed, loop


def start_processes(workdir, num_processes=2, extra_env=None, **overrides):
    """train.py on `num_processes` local processes; `extra_env[i]` adds to process i's env."""
    env = process_env(devices_per_process=4)
    extra_env = extra_env or {}
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    commands = process_commands(
        ["train.py", f"--workdir={workdir}", *flags], num_processes, free_port()
    )
    return [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, **extra_env.get(index, {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index, command in enumerate(commands)
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


def losses(workdir) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(workdir).items()}


def test_two_processes_train_as_one_and_resume_on_another_topology(tmp_path):
    short = {"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0}
    two = str(tmp_path / "2x4")
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **short}.items()]
    launcher = subprocess.run(
        [sys.executable, "tools/launch_local.py", "--processes=2", "--devices_per_process=4"]
        + ["--", "train.py", f"--workdir={two}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launcher.returncode == 0, launcher.stdout[-3000:]
    assert "[1] " in launcher.stdout and "[0] " in launcher.stdout

    one = str(tmp_path / "1x8")  # this process: 8 devices, the same (8, 1, 1) mesh
    loop.train(small_config(**short), one)
    assert sorted(losses(two)) == list(range(1, 7))
    np.testing.assert_allclose(list(losses(two).values()), list(losses(one).values()), rtol=1e-5)

    # The 2-process run's step 3 restores here, on one process and a (2, 2, 2) mesh.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    loop.train(small_config(**short, **mesh), resumed)
    assert sorted(losses(resumed)) == [4, 5, 6]
    np.testing.assert_allclose(
        [losses(resumed)[s] for s in (4, 5, 6)], [losses(one)[s] for s in (4, 5, 6)], rtol=1e-5
    )


def test_a_process_that_cannot_reach_the_coordinator_says_so():
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(UserError, match=f"process 1 could not reach the coordinator at {address}"):
        distributed.start(address, num_processes=2, process_id=1, timeout_s=1)
