"""Starting JAX's multi-process runtime: one process per host, process 0 the coordinator."""

import socket
import time

import jax

from errors import UserError


def start(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int = 300,
) -> None:
    """jax.distributed.initialize; None = detected from the environment (TPU, SLURM).

    A process other than 0 first waits up to `timeout_s` for the coordinator's
    port itself: JAX's own timeout ends the process from C++ with a message that
    blames "another task", which is not what a wrong address or a missing process
    0 looks like to a person.
    """
    if coordinator_address and process_id:
        _wait_for_coordinator(coordinator_address, process_id, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator_address={address} is not host:port.")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"process {process_id} could not reach the coordinator at {address} within "
                    f"{timeout_s} s: start process 0 there (it listens on that port), check "
                    "the address and that the port is open between the hosts."
                ) from None
            time.sleep(0.5)
