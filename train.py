"""Train a meshlm model.

    python train.py --workdir=/tmp/meshlm                       # configs/default.py
    python train.py --config=configs/gpt2_small.py --workdir=... --config.train.num_steps=100
    python train.py --workdir=... --dry_run                     # compile, report memory, exit

Re-running with the same --workdir resumes from its latest checkpoint. A mistake
in the config, the data or the workdir ends the run with one `error: ...` line.
"""

import json
import os
import sys

import startup

startup.quiet_start()  # before JAX is imported (TensorFlow: only if the data needs it)

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from errors import UserError  # noqa: E402
from training import distributed, loop  # noqa: E402
from training.memory import describe, out_of_memory_as_user_error  # noqa: E402
from training.trainer import Trainer  # noqa: E402

_CONFIG = startup.define_config_flag("Config file; override fields with --config.<field>=<value>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json go here.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Compile the train step, print parameter count and per-device memory (parameters, "
    "optimizer state, temporaries, the largest arrays and the knobs that shrink them), "
    "then exit without training.",
)
distributed.define_flags()
flags.mark_flag_as_required("workdir")


_DATA_STREAMS = []  # kept alive until exit_without_teardown(): see loop.train's `hold`


def run(config, workdir: str, dry_run: bool = False) -> None:
    """Trains (or only compiles, with `dry_run`); a UserError, or a device out of memory,
    becomes one `error:` line."""
    try:
        if not workdir.strip():
            raise UserError("--workdir is empty: name a directory for checkpoints and metrics.")
        if dry_run:
            report = Trainer(config).dry_run()
            memory = report.get("per_device_bytes", 0) / 2**30
            print(
                f"{report['num_params']:,} parameters; train step compiled in "
                f"{report['compile_seconds']:.1f} s; needs at most {memory:.2f} GiB per device "
                f"({jax.device_count()} x {jax.devices()[0].device_kind})."
            )
            print("\n".join(describe(report)))
            print(json.dumps(report))
            return
        with out_of_memory_as_user_error():
            result = loop.train(config, workdir, hold=_DATA_STREAMS)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    logging.info(
        "Finished at step %d: %s",
        result["step"],
        {k: round(v, 4) for k, v in result.items() if k in ("loss", "eval_loss")},
    )


def main(argv):
    del argv
    distributed.start_from_flags()
    logging.info(
        "JAX %s: %d processes, %d devices (%s)",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    run(_CONFIG.value, _WORKDIR.value, _DRY_RUN.value)
    exit_without_teardown()


def exit_without_teardown():
    """Exits now that every checkpoint and metric is on disk and closed.

    Left to the interpreter, tearing down the tf.data iterators (held in
    _DATA_STREAMS until now) waits for the tokenization still in flight: 2-37 s
    measured after the last step or a SIGTERM, a large share of a preemptible VM's
    ~30 s notice (benchmarks/preemption.py).
    """
    distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    startup.run(main)
