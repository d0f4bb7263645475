"""Two local processes under JAX's distributed runtime (4 CPU devices each, gloo collectives),
started as tools/launch_local.py starts them: on meshes built from a permuted device list they
train, evaluate and sample as one process of 8 devices does,
their checkpoints restore on another topology, and a SIGTERM sent to one of them brings
both to the same saved step."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from checkpoints.read import load_sampler
from data.hf_tokenizer import load_tokenizer
from errors import UserError
from evaluation.run import evaluate_workdir
from model.sampler import SamplingConfig, parse_mesh
from tests.test_eval import SFT_EXAMPLES, read_records
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


# Added to the XLA_FLAGS of the processes started here: they compile unoptimized, as this
# process does (conftest.py), where launch_local's environment would optimize every compile.
UNOPTIMIZED = " --xla_backend_optimization_level=0"


def start_processes(workdir, num_processes=2, extra_env=None, **overrides):
    """train.py on `num_processes` local processes; `extra_env[i]` adds to process i's env."""
    env = process_env(devices_per_process=4)
    env["XLA_FLAGS"] += UNOPTIMIZED
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


SHORT = {"train.num_steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 0}


# Loaded by Python at start-up from PYTHONPATH: every mesh is built from the devices in a
# permuted order (reversed, then odd positions first: each process's devices interleave
# with the other's and are out of order), as a TPU or GPU topology may order them. XLA_FLAGS,
# which launch_local.py sets, get UNOPTIMIZED before any compile.
PERMUTED_MESH = f"""
import os

os.environ["XLA_FLAGS"] += "{UNOPTIMIZED}"

import jax

_make_mesh = jax.make_mesh


def make_mesh(*args, devices=None, **kwargs):
    devices = list(jax.devices() if devices is None else devices)[::-1]
    devices = devices[1::2] + devices[::2]
    print("permuted mesh devices:", [d.id for d in devices], flush=True)
    return _make_mesh(*args, devices=devices, **kwargs)


jax.make_mesh = make_mesh
"""


def launch_two(script_args: list[str], tmp_path) -> str:
    """tools/launch_local.py runs `script_args` on 2 processes x 4 devices, each building
    its meshes from permuted devices (PERMUTED_MESH); its output, each line prefixed with
    its process's index."""
    hook = tmp_path / "permuted_mesh"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PERMUTED_MESH)
    launcher = subprocess.run(
        [sys.executable, "tools/launch_local.py", "--processes=2", "--devices_per_process=4"]
        + ["--", *script_args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(hook)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launcher.returncode == 0, launcher.stdout[-3000:]
    orders = re.findall(r"^\[\d\] permuted mesh devices: \[(.*)\]$", launcher.stdout, re.M)
    assert orders and all(o.split(", ") != sorted(o.split(", ")) for o in orders), orders
    return launcher.stdout


def write_eval_files(directory) -> dict:
    """{"text": a text file, "sft": an SFT JSONL file} in `directory`."""
    text, sft = directory / "text.txt", directory / "sft.jsonl"
    text.write_text((json.__doc__ or "") * 4)
    sft.write_text("".join(json.dumps(e) + "\n" for e in SFT_EXAMPLES))
    return {"text": str(text), "sft": str(sft)}


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """(launcher output, 2-process workdir, 1-process workdir, eval files): 6 steps of the
    same run, its evaluation tasks scored at the end."""
    root = tmp_path_factory.mktemp("topologies")
    files = write_eval_files(root)
    tasks = {"eval.text_files": files["text"], "eval.sft_file": files["sft"]}
    overrides = {**SHORT, **tasks, "eval.max_new_tokens": 4}
    two, one = str(root / "2x4"), str(root / "1x8")
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    output = launch_two(["train.py", f"--workdir={two}", *flags], root)
    loop.train(small_config(**overrides), one)  # this process: 8 devices, the same (8, 1, 1) mesh
    return output, two, one, files


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


def test_a_read_error_on_one_process_sets_the_step_aside_on_all(two_and_one, tmp_path):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(two_and_one[1], workdir)  # 2 processes wrote steps 3 and 6
    assert checkpoint_steps(workdir) == [3, 6]

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_READ.format(step=6))
    processes = start_processes(
        workdir, extra_env={1: {"PYTHONPATH": str(hook)}}, **{**SHORT, "train.num_steps": 8}
    )
    outputs = successful_outputs(processes)
    for index, output in enumerate(outputs):  # each process warns; process 0 reports
        assert "Checkpoint step 6 in " in output and " cannot be read" in output, f"process {index}"
    assert "Restored checkpoint at step 3" in outputs[0]
    set_aside = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    assert [name.split("-")[0] for name in set_aside] == ["6"]
    assert checkpoint_steps(workdir) == [3, 6, 8]  # step 6 trained again from step 3


# Wall-clock and throughput numbers differ run to run; every other logged number is compared.
WALL_CLOCK = {"step_time", "tokens_per_second", "mfu", "eta_seconds"}


def losses(workdir) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(workdir).items()}


def test_two_processes_train_as_one_and_resume_on_another_topology(two_and_one, tmp_path):
    output, two, one, _ = two_and_one
    assert "[1] " in output and "[0] " in output
    # Process 0 alone reports progress; the others log warnings and errors only.
    assert re.search(r"^\[0\] .*step 6/6 ", output, re.M), output[-3000:]
    assert not re.search(r"^\[1\] .*(step \d+/6|\d+ processes, \d+ devices)", output, re.M)
    assert sorted(losses(two)) == list(range(1, 7))
    np.testing.assert_allclose(list(losses(two).values()), list(losses(one).values()), rtol=1e-5)
    # Every number both runs log at the last step (train metrics, evaluation, the text and
    # SFT tasks) but wall-clock ones. (The 6-step model's greedy responses are newlines, so
    # the SFT task's exact match is 0 in both: eval.py's test below compares sampled text.)
    scored = [
        {k: v for r in read_records(w) if r["step"] == 6 for k, v in r.items()} for w in (two, one)
    ]
    shared = scored[0].keys() & scored[1].keys() - WALL_CLOCK
    assert {"eval_bits_per_byte", "eval_bytes", "text_bits_per_byte", "sft_bleu"} <= shared
    for key in sorted(shared):
        np.testing.assert_allclose(scored[0][key], scored[1][key], rtol=1e-5, err_msg=key)

    # The 2-process run's step 3 restores here, on one process and a (2, 2, 2) mesh.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    loop.train(small_config(**SHORT, **mesh), resumed)
    assert sorted(losses(resumed)) == [4, 5, 6]
    np.testing.assert_allclose(
        [losses(resumed)[s] for s in (4, 5, 6)], [losses(one)[s] for s in (4, 5, 6)], rtol=1e-5
    )


def test_processes_along_the_stage_axis_feed_the_same_rows(two_and_one, tmp_path):
    """mesh.stage=2 spans the two processes (devices in process order, stage outermost):
    both feed the whole batch, the pipeline's activations cross between them, and the
    losses are those of one process."""
    _, _, one, _ = two_and_one
    workdir = str(tmp_path)
    processes = start_processes(workdir, **SHORT, **{"mesh.stage": 2, "mesh.data": 4})
    successful_outputs(processes)
    assert sorted(losses(workdir)) == list(range(1, 7))
    np.testing.assert_allclose(
        list(losses(workdir).values()), list(losses(one).values()), rtol=1e-5
    )


def test_sample_and_eval_on_two_processes_give_what_one_process_gives(two_and_one, tmp_path):
    """sample.py and eval.py with --distributed (through launch_local.py): process 0 prints
    (and writes) the numbers and text that one process of 8 devices computes. Text is
    sampled (temperature 1, the default seed): the 6-step model's greedy text is newlines."""
    _, workdir, _, files = two_and_one
    sft = files["sft"]
    options = dict(text_files=files["text"], sft_file=sft, max_new_tokens=6, mesh="4,2,1")
    options["temperature"] = 1.0
    output = tmp_path / "eval.json"
    flags = [f"--{k}={v}" for k, v in options.items()]
    printed = launch_two(
        ["eval.py", f"--workdir={workdir}", *flags, f"--output={output}"], tmp_path
    )
    assert re.search(r"^\[0\] data ", printed, re.M) and not re.search(
        r"^\[1\] data", printed, re.M
    )
    ours = json.loads(output.read_text())["results"]
    alone = evaluate_workdir(workdir, **options)["results"]
    assert ours.keys() == alone.keys()
    for name in alone:
        assert ours[name].keys() == alone[name].keys()
        for metric in ours[name].keys() - WALL_CLOCK - {"predictions"}:
            np.testing.assert_allclose(ours[name][metric], alone[name][metric], rtol=1e-5)
    predictions = alone[f"sft:{sft}"]["predictions"]
    assert ours[f"sft:{sft}"]["predictions"] == predictions
    assert all(p.strip() for p in predictions), predictions  # text, not only whitespace

    prompt = "def main("
    printed = launch_two(
        ["sample.py", f"--workdir={workdir}", f"--prompt={prompt}", "--temperature=1"]
        + ["--max_new_tokens=8", "--num_samples=2"],
        tmp_path,
    )
    sampler, run = load_sampler(workdir, parse_mesh("-1,1,1"))
    tokenizer = load_tokenizer(run.config.data.tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1)
    (new, _) = sampler.generate([tokenizer.encode(prompt)] * 2, sampling, tokenizer.eos_id)
    lines = [line[4:] for line in printed.splitlines() if line.startswith("[0] ")]
    expected = prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    assert expected.strip() != prompt, expected
    assert expected in "\n".join(lines)
    assert sum(line.startswith("--- sample ") for line in lines) == 2
    assert not re.search(r"^\[1\] --- sample", printed, re.M)


def test_a_process_that_cannot_reach_the_coordinator_says_so():
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(UserError, match=f"process 1 could not reach the coordinator at {address}"):
        distributed.start(address, num_processes=2, process_id=1, timeout_s=1)
