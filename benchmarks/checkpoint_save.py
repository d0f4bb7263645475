"""Checkpoint save time, asynchronous vs synchronous, for a config's train state.

    python benchmarks/checkpoint_save.py --config=configs/default.py
    python benchmarks/checkpoint_save.py --config=configs/gpt2_small.py

"blocking" is how long the train loop is held up by `save()`; "total" is until
the checkpoint is complete on disk. Asynchronous saving hides the difference
behind the following train steps.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from errors import UserError  # noqa: E402
from training.checkpoint import Checkpointer  # noqa: E402
from training.trainer import Trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves per mode; the median is reported.")


def time_saves(trainer, state, async_save: bool) -> dict:
    blocking, total = [], []
    with tempfile.TemporaryDirectory() as workdir:
        checkpointer = Checkpointer(workdir, keep=2, async_save=async_save)
        for step in range(1, _REPEATS.value + 1):
            start = time.perf_counter()
            checkpointer.save(step, state, {"epoch": 0, "window": step}, config={}, model_config={})
            blocking.append(time.perf_counter() - start)
            checkpointer.wait()
            total.append(time.perf_counter() - start)
        checkpointer.close()
    return {"blocking_s": float(np.median(blocking)), "total_s": float(np.median(total))}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(describe_machine())
    try:
        trainer = Trainer(_CONFIG.value)
    except UserError as error:  # a bad --config value: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    state = trainer.init_state()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    result = {"params": trainer.num_params, "state_bytes": size}
    for mode in ("async", "sync"):
        result[mode] = time_saves(trainer, state, async_save=mode == "async")
        print(
            f"{mode:5s}: blocks the loop {result[mode]['blocking_s']:.3f} s, complete on disk "
            f"after {result[mode]['total_s']:.3f} s ({size / 1e6:.0f} MB of state)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
