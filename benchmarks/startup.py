"""Launch to first step of `python train.py`: the time a researcher waits before a run trains.

    python benchmarks/startup.py                       # configs/default.py, 2 launches
    python benchmarks/startup.py --launches=3 --timeline
    MESHLM_JAX_CACHE=0 python benchmarks/startup.py    # without the persistent compile cache

Each launch is a fresh workdir (no checkpoint to restore) with the step logged at step 1;
the clock runs from starting the process to that step's log line, and the process is then
stopped. The first launch fills the persistent compilation cache (delete ~/.cache/meshlm/jax
to time a cold one); the following ones reuse it, as a user's second run would. The token
cache must already exist (a first run of the config makes it). `--timeline` prints every
log line of the last launch with its time since launch: where the seconds go.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import machine_info  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_to_first_step(config: str, workdir: str) -> tuple[float, list[tuple[float, str]]]:
    """Seconds from launch to the first step's log line, and (seconds, line) of every line."""
    command = [
        sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
        "--config.train.log_every=1", "--alsologtostderr",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
            if " step 1/" in line:
                return lines[-1][0], lines
    finally:
        process.kill()
        process.wait()
    raise RuntimeError("train.py exited before its first step:\n" + "\n".join(l for _, l in lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--launches", type=int, default=2)
    parser.add_argument("--timeline", action="store_true", help="the last launch's log lines")
    args = parser.parse_args()
    print(machine_info.describe())
    timeline = []
    for launch in range(1, args.launches + 1):
        with tempfile.TemporaryDirectory() as workdir:
            seconds, timeline = launch_to_first_step(args.config, workdir)
        print(f"launch {launch}: {seconds:.1f} s to the first step ({args.config})")
    if args.timeline:
        for seconds, line in timeline:
            print(f"{seconds:7.2f} s  {line[:150]}")


if __name__ == "__main__":
    main()
