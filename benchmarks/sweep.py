"""Wall time of a whole sweep: configs/sweeps/lr.py's 8 trials, sequential vs vectorized.

    python benchmarks/sweep.py                    # default config, 50 steps a trial
    python benchmarks/sweep.py --num_steps=300 --modes=vectorized

Runs `sweep.py` end to end in each mode (sequential: one train.py process per
trial, start-up included; vectorized: one process, one compile) on the default
config with train.num_steps shrunk (evaluation only at the end), then prints the
wall time of each mode and the largest difference between the modes' final eval
losses, as a check that they trained the same trials. Prints one JSON line last.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
from configs.default import get_config as default_config


def get_config():
    config = default_config()
    config.train.update(num_steps={num_steps}, eval_every=0)
    config.checkpoint.every_steps = 0
    return config
"""


def run_sweep(config_path: str, workdir: str, vectorized: bool) -> tuple[float, dict]:
    """(seconds, {trial: final eval loss}) of one `sweep.py` run."""
    command = [
        sys.executable,
        os.path.join(ROOT, "sweep.py"),
        f"--config={config_path}",
        f"--sweep={os.path.join(ROOT, 'configs/sweeps/lr.py')}",
        f"--workdir={workdir}",
        *(["--vectorized"] if vectorized else []),
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert all(r["status"] == "done" for r in rows), rows
    return seconds, {r["trial"]: float(r["final_eval_loss"]) for r in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_steps", type=int, default=50)
    parser.add_argument("--modes", default="sequential,vectorized")
    args = parser.parse_args()
    results = {"num_steps": args.num_steps, "load_average_before": os.getloadavg()[0]}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.py")
        with open(config_path, "w") as f:
            f.write(CONFIG.format(num_steps=args.num_steps))
        for mode in args.modes.split(","):
            seconds, losses[mode] = run_sweep(
                config_path, os.path.join(tmp, mode), mode == "vectorized"
            )
            results[f"{mode}_seconds"] = round(seconds, 1)
            print(f"{mode}: 8 trials x {args.num_steps} steps in {seconds:.1f} s", flush=True)
    if len(losses) == 2:
        first, second = losses.values()
        results["max_eval_loss_difference"] = max(abs(first[k] - second[k]) for k in first)
        print(f"largest difference of final eval losses: {results['max_eval_loss_difference']:.2e}")
    results["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
