"""Preemption: a SIGTERM asks the run to save and exit, at the same step on every process.

One process: a SIGTERM handler sets a flag that the loop reads after each step
(and after an evaluation, so a signal that arrives while evaluating still leads
to a save). Several processes: JAX's preemption sync point, which the
distributed runtime's coordination service drives (it installs its own SIGTERM
handler), so a notice received by any one process brings every process to the
same step, the first one all of them can still reach.
"""

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """`reached(step)`: True once a SIGTERM asked to stop; call once per step, on every process."""

    def __init__(self):
        self.requested = False
        self.multi_process = jax.process_count() > 1
        self._previous = None
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multi_process and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
