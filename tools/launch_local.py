"""Try multi-host on one machine: N local processes x M simulated CPU devices each.

    python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
        train.py --workdir=/tmp/meshlm-2x4 --config.train.num_steps=50

Each process runs the given script with `--distributed --coordinator_address=
127.0.0.1:<free port> --num_processes=N --process_id=i` appended, exactly as
one process per host of a TPU pod slice or GPU cluster would (docs/scaling.md).
Their output is printed line by line, prefixed `[i]`. Ctrl-C or SIGTERM is
passed to every process (they save a checkpoint and exit together); when one
process fails, the others get SIGTERM, then are killed 30 s later if a
collective holds them. Exits with the first non-zero status.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GRACE_SECONDS = 30  # after one process fails, the others' time to exit before they are killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict:
    """This environment with M simulated CPU devices, and no accelerator."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
    )


def process_commands(script_args: list[str], num_processes: int, port: int) -> list[list[str]]:
    """One command line per process: the script and its flags, then the runtime's flags."""
    script, *args = script_args
    return [
        [
            sys.executable,
            os.path.join(REPO, script) if not os.path.isabs(script) else script,
            *args,
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
        ]
        for index in range(num_processes)
    ]


def _print_lines(index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def launch(script_args: list[str], num_processes: int, devices_per_process: int) -> int:
    env = process_env(devices_per_process)
    commands = process_commands(script_args, num_processes, free_port())
    processes = [
        subprocess.Popen(
            c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
    ]
    printers = [
        threading.Thread(target=_print_lines, args=(i, p.stdout), daemon=True)
        for i, p in enumerate(processes)
    ]
    for t in printers:
        t.start()

    def forward(signum, _frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status, kill_at = 0, None
    while any(p.poll() is None for p in processes):
        time.sleep(0.2)
        failed = [p.returncode for p in processes if p.returncode]
        if failed and not status:  # the others would wait for it in a collective forever
            status, kill_at = failed[0], time.monotonic() + _GRACE_SECONDS
            forward(signal.SIGTERM, None)
        if kill_at and time.monotonic() > kill_at:
            for p in processes:
                p.kill()
    for t in printers:
        t.join(timeout=5)
    return status or next((p.returncode for p in processes if p.returncode), 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="local processes (hosts)")
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices each")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py and its flags")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the script to run after --, e.g. -- train.py --workdir=/tmp/run")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be at least 1")
    return launch(script, args.processes, args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
