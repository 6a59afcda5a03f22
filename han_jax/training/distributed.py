"""JAX's multi-controller runtime: several processes (one per host, or per GPU) running one training.

:func:`start_distributed` starts ``jax.distributed`` before any other JAX work, with checks
that fail in one line and a watchdog that ends a process whose peers never arrive; the
layout of the steps over every device of every process is
:class:`han_jax.training.devices.ShardedDevices`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Optional

import jax

# jax.distributed.initialize's own default, in seconds.
DEFAULT_DISTRIBUTED_TIMEOUT = 300
# Environment that means "this process is one task of a multi-task cluster job": with it (and no explicit
# --coordinator-address), han-jax starts jax.distributed and lets JAX read the cluster's settings.
_CLUSTER_TASK_COUNTS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class DistributedStartError(RuntimeError):
    """JAX's distributed runtime could not start (an address, an id, a timeout); the message says which."""


def is_primary() -> bool:
    """True in the process that writes reports (process 0; the only process of a one-process run)."""
    return jax.process_index() == 0


def cluster_detected(environ=None) -> bool:
    """Whether this process is one task of a multi-task cluster job (SLURM, Open MPI) that JAX can read."""
    environ = os.environ if environ is None else environ
    for name in _CLUSTER_TASK_COUNTS:
        try:
            if int(environ.get(name, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def start_distributed(*, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                      process_id: Optional[int] = None, timeout_s: int = DEFAULT_DISTRIBUTED_TIMEOUT,
                      command: str = "han-jax") -> None:
    """Starts ``jax.distributed`` before any other JAX work, with CPU collectives (gloo).

    With no argument, ``jax.distributed.initialize()`` reads the cluster's own
    settings (SLURM, Open MPI, Cloud TPU, ...). Arguments are checked first, and a
    start that does not finish within ``timeout_s`` ends the process with one line
    naming the coordinator, instead of XLA's abort after its own timeout (an abort
    that Python cannot catch): a process other than 0 first waits for the
    coordinator's port to accept connections.

    Raises:
      DistributedStartError: bad arguments, or a coordinator that never answers.
    """
    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedStartError(f"{', '.join(missing)}: expected with the other distributed flags (all "
                                        "three, or none to let JAX read the cluster's settings)")
        host, sep, port = coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedStartError(f"--coordinator-address={coordinator_address!r}: expected HOST:PORT")
        if not isinstance(num_processes, int) or num_processes < 1:
            raise DistributedStartError(f"--num-processes={num_processes}: expected an integer >= 1")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise DistributedStartError(f"--process-id={process_id}: expected 0..{num_processes - 1} (one id per "
                                        f"process of --num-processes={num_processes})")
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise DistributedStartError(f"--distributed-timeout={timeout_s}: expected whole seconds >= 1")
    # CPU collectives across processes; without this a CPU computation spanning processes fails.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + timeout_s
    where = coordinator_address or "the cluster's coordinator"
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
    if coordinator_address is not None and process_id != 0:
        _wait_for_port(coordinator_address, deadline, timeout_s, who)
    remaining = max(1, int(deadline - time.monotonic()))
    everyone = f"all {num_processes} processes" if num_processes else "every process"
    watchdog = threading.Timer(remaining, _give_up, args=(
        f"{command}: error: JAX's distributed runtime did not start within {timeout_s} s ({who}, coordinator "
        f"{where}): not every process joined; start {everyone} with the same --coordinator-address and "
        "--num-processes, each with its own --process-id",))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own timeout comes after the watchdog's, so the watchdog's one line is what the user sees.
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=remaining + 30)
    except Exception as e:  # noqa: BLE001 - any start failure becomes one line naming the coordinator
        raise DistributedStartError(f"jax.distributed.initialize ({who}, coordinator {where}): "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        watchdog.cancel()


def _wait_for_port(address: str, deadline: float, timeout_s: int, who: str) -> None:
    host, _, port = address.rpartition(":")
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise DistributedStartError(
                    f"coordinator {address} did not answer within {timeout_s} s ({who}): start process 0 with "
                    "--process-id 0 there first, or check --coordinator-address") from None
            time.sleep(0.25)


def _give_up(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    os._exit(2)
