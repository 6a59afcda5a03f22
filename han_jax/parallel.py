"""Devices and processes: where a step runs, how a batch is laid out, where the state lives.

One step body (:mod:`han_jax.steps`) runs in three layouts, picked by
:func:`make_parallel` from ``TrainConfig.num_devices`` and ``TrainConfig.parallel``:

* ``single``: one device, plain ``jit``.
* ``sharded`` (the default for more than one device): ``jit`` over a
  :class:`~jax.sharding.Mesh` with one axis, ``data``. Every batch is split along
  its rows with a ``NamedSharding``, the train state is replicated, and the step
  sees the *global* batch: the losses' batch statistics are global without any
  ``axis_name`` (XLA inserts the all-reduces), and dropout draws the same bits as
  on one device (``unsafe_rbg`` and ``jax_threefry_partitionable`` both give
  sharding-independent streams). N devices therefore give one device's numbers up
  to float summation order.
* ``pmap``: the same body with ``axis_name``; batches and state carry a leading
  device axis. JAX keeps ``pmap`` in maintenance mode; it stays selectable
  (``--parallel pmap``) for the runs that use it. Each device draws its own
  dropout mask (the key is folded with the device index), so with dropout on its
  numbers are those of another, equally valid, draw.

Several processes (hosts) run the ``sharded`` layout over every device of every
process once :func:`start_distributed` has started JAX's multi-controller runtime
(``jax.distributed``). Each process builds the same data split and the same
batch order, and hands JAX only its own rows of each global batch
(``jax.make_array_from_process_local_data``); orbax saves the replicated state
collectively; :func:`is_primary` says which process writes the run folder's
reports.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from han_jax.config import Config, TrainConfig
from han_jax.data import SplitData, iterate_batches
from han_jax.validation import ConfigError

DATA_AXIS = "data"
PARALLEL_KINDS = ("sharded", "pmap")
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


@dataclasses.dataclass(frozen=True)
class Parallel:
    """One layout of the steps over devices; see the module docstring.

    Attributes:
      kind: ``"single"``, ``"sharded"`` or ``"pmap"``.
      num_devices: devices that share each step (all processes together).
      mesh: the ``sharded`` layout's one-axis mesh.
    """

    kind: str
    num_devices: int
    mesh: Optional[Mesh] = None

    @property
    def device_axis(self) -> bool:
        """Whether step outputs carry a leading device axis (pmap)."""
        return self.kind == "pmap"

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def steps(self, config: Config):
        """The compiled :class:`~han_jax.steps.Steps` of this layout."""
        from han_jax.steps import jit_steps, pmap_steps, sharded_steps

        if self.kind == "pmap":
            return pmap_steps(config)
        if self.kind == "sharded":
            return sharded_steps(config, self.mesh)
        return jit_steps(config)

    def put_state(self, state):
        """The state placed for the steps: replicated over the mesh, or one copy per pmap device."""
        if self.kind == "pmap":
            return replicate(state, self.num_devices)
        if self.kind == "sharded":
            # Through the host: every process holds the same values, and device_put of host data onto a
            # mesh that spans processes is the supported way to make them one global array.
            return jax.device_put(jax.device_get(state), self.replicated)
        return state

    def local_state(self, state):
        """This process's own copy of a placed state, on its first device, uncommitted as a fresh state is."""
        if self.kind == "pmap":
            return unreplicate(state)
        if self.kind == "sharded":
            return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), state)
        return state

    def checkpoint_view(self, state):
        """What orbax saves: the replicated global state (saved collectively, once), else one copy."""
        return unreplicate(state) if self.kind == "pmap" else state

    def epoch(self, epoch: int):
        """``start_epoch``'s epoch argument in this layout."""
        if self.kind == "pmap":
            return jnp.full((self.num_devices,), epoch, jnp.int32)
        if self.kind == "sharded":
            return jax.device_put(np.int32(epoch), self.replicated)
        return jnp.int32(epoch)

    def first(self, tree):
        """Step outputs as one device's values (the first copy under pmap)."""
        return jax.tree_util.tree_map(lambda x: x[0], tree) if self.kind == "pmap" else tree

    def batches(self, split: SplitData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                epoch: int = 0) -> Iterator:
        """:func:`~han_jax.data.iterate_batches` laid out for the steps.

        ``sharded``: each process gathers only the rows its devices hold and JAX
        assembles the global batch from every process's rows.
        """
        if self.kind != "sharded":
            yield from iterate_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                       num_devices=self.num_devices if self.kind == "pmap" else None)
            return
        rows = self.process_rows(batch_size)
        for batch in iterate_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rows=rows):
            yield self._global(batch, batch_size)

    def put_batch(self, batch):
        """A whole (global) host batch laid out for the steps; each process places only its own rows."""
        batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if self.kind == "pmap":
            return jax.tree_util.tree_map(lambda x: x.reshape((self.num_devices, -1) + x.shape[1:]), batch)
        if self.kind == "sharded":
            rows = self.process_rows(batch_size)
            return self._global(jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch), batch_size)
        return batch

    def _global(self, local_batch, batch_size: int):
        sharding = self.rows
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:]), local_batch)

    def process_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of ``batch_size`` that this process's devices hold."""
        if batch_size % self.num_devices:
            raise ConfigError(f"train.batch_size={batch_size}: expected a multiple of the {self.num_devices} "
                              "devices of the run (each device takes an equal share of a batch)")
        if self.kind != "sharded":
            return slice(0, batch_size)
        index = self.rows.addressable_devices_indices_map((batch_size,))
        starts = sorted(idx[0].start or 0 for idx in index.values())
        stops = sorted(batch_size if idx[0].stop is None else idx[0].stop for idx in index.values())
        if any(b != a for a, b in zip(stops[:-1], starts[1:])):
            raise RuntimeError(f"this process's devices hold rows {list(zip(starts, stops))} of a batch: expected "
                               "one contiguous block (the mesh is built in process order)")
        return slice(starts[0], stops[-1])


def make_parallel(train: TrainConfig) -> Parallel:
    """The layout for ``train.num_devices`` and ``train.parallel`` in this process (and its peers).

    A multi-process run always uses every device of every process, sharded.
    """
    n, kind = train.num_devices, train.parallel
    if kind not in PARALLEL_KINDS:
        raise ConfigError(f"train.parallel={kind!r}: expected one of {', '.join(PARALLEL_KINDS)}")
    if jax.process_count() > 1:
        if kind == "pmap":
            raise ConfigError(f"train.parallel='pmap' with {jax.process_count()} processes: expected 'sharded' "
                              "(multi-process runs use sharded jit)")
        if n != jax.device_count():
            raise ConfigError(f"train.num_devices={n}: a run over {jax.process_count()} processes uses all "
                              f"{jax.device_count()} of their devices; expected {jax.device_count()}")
        return Parallel("sharded", n, _mesh(jax.devices()))
    if n > jax.local_device_count():
        raise ConfigError(f"train.num_devices={n}: expected at most the {jax.local_device_count()} local "
                          f"{jax.default_backend()} device(s)")
    if n == 1:
        return Parallel("single", 1)
    if kind == "pmap":
        return Parallel("pmap", n)
    return Parallel("sharded", n, _mesh(jax.local_devices()[:n]))


def _mesh(devices) -> Mesh:
    # Process-major order, so each process's devices hold one contiguous block of rows. Auto axis types:
    # flax linen modules carry no sharding annotations; XLA propagates the batch sharding through them.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, n: int):
    """One copy per device, laid out as pmap's own outputs are.

    Broadcasting alone leaves the copies on one device; pmap would then see its
    sharded output as a new kind of input on the second step and compile again.
    """
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)
    return jax.pmap(lambda x: x)(stacked)


def unreplicate(tree):
    """The first device's copy of a replicated pytree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


# ---------------------------------------------------------------------------
# JAX's multi-controller runtime.
# ---------------------------------------------------------------------------


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
