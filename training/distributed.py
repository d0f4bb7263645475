"""Starting JAX's multi-process runtime: one process per host, process 0 the coordinator.

train.py, sample.py and eval.py share the flags: `define_flags()` at import, then
`start_from_flags()` first thing in main and `shutdown()` at the end.
"""

import socket
import time

import jax
from absl import flags, logging

from errors import UserError


def define_flags() -> None:
    """--distributed, --coordinator_address, --num_processes, --process_id, --distributed_timeout."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Start JAX's multi-process runtime first (jax.distributed.initialize): one process "
        "per host of a TPU pod slice or GPU cluster. Detected from the environment on TPU "
        "and SLURM; elsewhere give --coordinator_address, --num_processes and --process_id.",
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
    flags.DEFINE_integer("num_processes", None, "With --distributed.")
    flags.DEFINE_integer("process_id", None, "This process, 0-based; with --distributed.")
    flags.DEFINE_integer(
        "distributed_timeout", 300, "Seconds to wait for the coordinator and the other processes."
    )


def start_from_flags() -> None:
    """Starts the runtime when --distributed is set (a mistake ends the process with one
    `error:` line); on every process but 0, absl then logs warnings and errors only, so a
    pod's logs are not N copies of the same progress lines."""
    f = flags.FLAGS
    if f.distributed:
        try:
            start(f.coordinator_address, f.num_processes, f.process_id, f.distributed_timeout)
        except UserError as error:
            raise SystemExit(f"error: {error}") from None
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)


def shutdown() -> None:
    """Leaves the coordination service in step with the other processes (no-op alone)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


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


def feed_position(sharding, global_batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds the index-th of `count` equal parts of the global
    batch (the data pipeline's process_index and process_count). Processes that differ only
    along axes the batch is not split over (mesh.stage, mesh.tensor) hold the same rows, so
    they feed the same part."""
    rows = {}  # process -> the row ranges of its devices
    for device, index in sharding.devices_indices_map((global_batch_size, 1)).items():
        start, stop, _ = index[0].indices(global_batch_size)
        rows.setdefault(device.process_index, set()).add((start, stop))
    return feed_positions(rows, global_batch_size)[jax.process_index()]


def feed_positions(rows: dict, global_batch_size: int) -> dict:
    """{process: (index, count)} from {process: {(start, stop) row range of each device}}:
    processes holding the same ranges share an index (numbered in process order). Where rows
    land in the batch does not matter (jax.make_array_from_process_local_data places them),
    but the parts must be equal and disjoint."""
    parts = list(dict.fromkeys(frozenset(rows[p]) for p in sorted(rows)))
    sizes = {sum(stop - start for start, stop in part) for part in parts}
    if sizes != {global_batch_size // len(parts)} or len(set().union(*parts)) != sum(
        map(len, parts)
    ):
        raise UserError(
            "config.mesh: the processes' devices hold overlapping or unequal parts of the "
            "batch's rows (the batch is split over mesh.data x mesh.fsdp x mesh.expert, not "
            "mesh.stage or mesh.tensor); make mesh.stage x mesh.data x mesh.fsdp x mesh.expert "
            "a multiple of the process count, e.g. mesh.stage = the process count."
        )
    return {p: (parts.index(frozenset(rows[p])), len(parts)) for p in rows}
