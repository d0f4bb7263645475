"""Seconds from SIGTERM to a checkpoint on disk and to process exit, for a real train.py run.

    python benchmarks/preemption.py                       # configs/default.py, 3 runs
    python benchmarks/preemption.py --mode=finish         # last step's evaluation -> exit
    python benchmarks/preemption.py --repeats=5 -- --config.model.num_layers=8

`preempt`: starts `train.py` (any flags after `--` are passed on), waits until
`--after_steps` steps are logged, sends SIGTERM, and times the signal to the
checkpoint directory being complete (orbax renames it into place only when it
is) and to the process exit. Preemptible VMs give about 30 s of notice.
`finish`: a run of `--finish_steps` steps, timed from its final evaluation
record to exit. Prints one line per run, then one JSON line with every number.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.machine_info import describe as describe_machine  # noqa: E402


def records(workdir: str) -> list[dict]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def logged_step(workdir: str) -> int:
    return max((r["step"] for r in records(workdir) if "loss" in r), default=0)


def wait_until(condition, process, timeout=600.0, poll=0.02) -> float:
    deadline = time.perf_counter() + timeout
    while not condition():
        if process.poll() is not None and not condition():
            raise RuntimeError(f"train.py exited with {process.returncode} too early")
        if time.perf_counter() > deadline:
            raise TimeoutError("timed out")
        time.sleep(poll)
    return time.perf_counter()


def saved_steps(workdir: str) -> list[str]:
    directory = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []


def one_run(args, extra_flags) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        steps = 100_000 if args.mode == "preempt" else args.finish_steps
        command = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--workdir={workdir}",
            f"--config.train.num_steps={steps}",
            "--config.checkpoint.every_steps=0",
            f"--config.optimizer.warmup_steps={min(10, steps)}",
            *extra_flags,
        ]
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            if args.mode == "preempt":
                wait_until(lambda: logged_step(workdir) >= args.after_steps, process)
                start = time.perf_counter()
                process.send_signal(signal.SIGTERM)
                saved = wait_until(lambda: bool(saved_steps(workdir)), process)
            else:
                start = wait_until(
                    lambda: any("eval_loss" in r and r["step"] == steps for r in records(workdir)),
                    process,
                )
                saved = wait_until(lambda: bool(saved_steps(workdir)), process)
            exit_code = process.wait(timeout=600)
        finally:
            process.kill()
        return {
            "to_checkpoint_s": saved - start,
            "to_exit_s": time.perf_counter() - start,
            "exit_code": exit_code,
            "step": int(max(saved_steps(workdir), key=int)),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("preempt", "finish"), default="preempt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--after_steps", type=int, default=30, help="steps logged before SIGTERM")
    parser.add_argument("--finish_steps", type=int, default=40)
    args, extra_flags = parser.parse_known_args()
    extra_flags = [f for f in extra_flags if f != "--"]
    print(describe_machine())
    runs = []
    for index in range(args.repeats):
        load = os.getloadavg()[0]
        run = one_run(args, extra_flags)
        runs.append({**run, "load_average": load})
        print(
            f"run {index + 1}: {args.mode} at step {run['step']}: checkpoint on disk after "
            f"{run['to_checkpoint_s']:.2f} s, exit after {run['to_exit_s']:.2f} s "
            f"(code {run['exit_code']}; load average {load:.2f})"
        )
    summary = {
        "mode": args.mode,
        "flags": extra_flags,
        "median_to_checkpoint_s": statistics.median(r["to_checkpoint_s"] for r in runs),
        "median_to_exit_s": statistics.median(r["to_exit_s"] for r in runs),
        "max_to_exit_s": max(r["to_exit_s"] for r in runs),
        "runs": runs,
    }
    print(
        f"median: checkpoint {summary['median_to_checkpoint_s']:.2f} s, exit "
        f"{summary['median_to_exit_s']:.2f} s (max {summary['max_to_exit_s']:.2f} s)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
