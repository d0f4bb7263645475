"""Wall time of a whole sweep: configs/sweeps/lr.py's 8 trials, sequential vs vectorized.

    python benchmarks/sweep.py                    # default config, 50 steps a trial
    python benchmarks/sweep.py --num_steps=300 --modes=vectorized
    python benchmarks/sweep.py --trials=3         # lr.py's first 3 trials only
    python benchmarks/sweep.py --workdir=/tmp/sweep_bench   # keep each mode's sweep there

Runs `sweep.py` end to end in each mode (sequential: one train.py process per
trial, start-up included; vectorized: one process, one compile) on the default
config with `--config.train.num_steps` shrunk (every step logged, evaluation only
at the end; lr.py's warmups of 10 and 30 steps need more than 30). Prints the
machine, each mode's wall time and median train step time (after the first logged
step, which includes the compile), the time of each sequential trial not spent in
train steps, and, to check that the modes trained the same trials, per trial the
largest difference of the logged train losses, the final eval losses and the largest
gradient norm in each mode. Prints one JSON line last.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.machine_info import describe  # noqa: E402
from training import sweeps  # noqa: E402

SWEEP = """
from configs.sweeps.lr import get_sweep as lr_sweep


def get_sweep():
    return lr_sweep()[:{trials}]
"""


def run_sweep(sweep_path: str, workdir: str, num_steps: int, vectorized: bool) -> float:
    """Seconds of one `sweep.py` run; every trial must finish."""
    command = [
        sys.executable,
        os.path.join(ROOT, "sweep.py"),
        f"--sweep={sweep_path}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.checkpoint.every_steps=0",
        *(["--vectorized"] if vectorized else []),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    statuses = {n: sweeps.read_status(os.path.join(workdir, n)) for n in sweeps.read_sweep(workdir)}
    assert all(s["status"] == "done" for s in statuses.values()), statuses
    return seconds


def trial_metrics(workdir: str) -> dict[str, dict]:
    """{trial: its train losses, step times (the first, with the compile, left out), largest
    gradient norm and final eval loss}."""
    results = {}
    for name in sweeps.read_sweep(workdir):
        records = sweeps.read_metrics(os.path.join(workdir, name))
        trains = [r for r in records if "loss" in r]
        results[name] = {
            "losses": [r["loss"] for r in trains],
            "step_times": [r["step_time"] for r in trains[1:]],
            "max_grad_norm": max(r["grad_norm"] for r in trains),
            "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r][-1],
        }
    return results


def compare(first: dict, second: dict, modes: list[str]) -> dict:
    """Per trial: the largest train-loss difference over all steps, the eval-loss difference
    and each mode's largest gradient norm (printed as a table)."""
    print(
        f"trial | largest train-loss difference | eval loss ({modes[0]}, {modes[1]}) | "
        f"difference | largest grad norm ({modes[0]}, {modes[1]})"
    )
    rows = {}
    for name, a in first.items():
        b = second[name]
        loss_difference = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
        rows[name] = {
            "max_train_loss_difference": loss_difference,
            "eval_loss_difference": abs(a["eval_loss"] - b["eval_loss"]),
        }
        print(
            f"{name} | {loss_difference:.1e} | {a['eval_loss']:.6f}, {b['eval_loss']:.6f} | "
            f"{rows[name]['eval_loss_difference']:.1e} | "
            f"{a['max_grad_norm']:.2f}, {b['max_grad_norm']:.2f}"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_steps", type=int, default=50)
    parser.add_argument("--modes", default="sequential,vectorized")
    parser.add_argument("--trials", type=int, default=8, help="the first N of lr.py's 8 trials")
    parser.add_argument("--workdir", help="keep each mode's sweep in WORKDIR/<mode>")
    args = parser.parse_args()
    print(describe(), flush=True)
    results = {"num_steps": args.num_steps, "trials": args.trials}
    results["load_average_before"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        sweep_path = os.path.join(workdir, "sweep_def.py")
        with open(sweep_path, "w") as f:
            f.write(SWEEP.format(trials=args.trials))
        metrics = {}
        for mode in args.modes.split(","):
            mode_dir = os.path.join(workdir, mode)
            seconds = run_sweep(sweep_path, mode_dir, args.num_steps, mode == "vectorized")
            metrics[mode] = trial_metrics(mode_dir)
            step = statistics.median(t for m in metrics[mode].values() for t in m["step_times"])
            results[mode] = {"seconds": round(seconds, 1), "median_step_seconds": step}
            print(
                f"{mode}: {args.trials} trials x {args.num_steps} steps in {seconds:.1f} s; "
                f"median train step {step * 1000:.0f} ms"
                + (f" for all {args.trials} trials" if mode == "vectorized" else ""),
                flush=True,
            )
            if mode == "sequential":
                per_trial = seconds / args.trials
                outside = per_trial - args.num_steps * step
                results[mode].update(seconds_per_trial=per_trial, outside_steps=outside)
                print(
                    f"sequential: {per_trial:.1f} s a trial, of which ~{outside:.1f} s is not "
                    "train steps (start-up, compile, data, evaluation)"
                )
        if len(metrics) == 2:
            results["trials_compared"] = compare(*metrics.values(), list(metrics))
    results["load_average_after"] = os.getloadavg()[0]
    print(f"load average after: {results['load_average_after']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
