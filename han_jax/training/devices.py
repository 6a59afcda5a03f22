"""Device layouts: where a step runs, how a batch is laid out, where the state lives.

One step body (:mod:`han_jax.training.steps`) runs in three layouts behind one interface,
:class:`Devices`, picked by :func:`make_devices` from ``TrainConfig.num_devices`` and
``TrainConfig.parallel``:

* :class:`SingleDevice`: one device, plain ``jit``.
* :class:`ShardedDevices` (the default for more than one device): ``jit`` over a
  :class:`~jax.sharding.Mesh` with one axis, ``data``. Every batch is split along its rows
  with a ``NamedSharding``, the train state is replicated, and the step sees the *global*
  batch: the losses' batch statistics are global without any ``axis_name`` (XLA inserts
  the all-reduces), and dropout draws the same bits as on one device (``unsafe_rbg`` and
  ``jax_threefry_partitionable`` both give sharding-independent streams). N devices
  therefore give one device's numbers up to float summation order. Several processes
  (``han_jax.training.distributed``) use this layout over every device of every process:
  each builds the same batch order and hands JAX only its own rows
  (``jax.make_array_from_process_local_data``).
* :class:`PmapDevices`: the same body under ``jax.pmap`` with ``axis_name``; batches and
  state carry a leading device axis. JAX keeps ``pmap`` in maintenance mode; it stays
  selectable (``--parallel pmap``) for the runs that use it. Each device draws its own
  dropout mask (the key is folded with the device index), so with dropout on its numbers
  are those of another, equally valid, draw.

Each layout compiles the steps of a :class:`~han_jax.training.spec.StepSpec` once
(:meth:`Devices.compiled`); :meth:`Devices.steps` binds a run's learning-rate
:class:`~han_jax.training.schedule.Schedule` to them (a run-time value, so runs of other
lengths or rates share the compiled steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from han_jax.config import ConfigError
from han_jax.data import SplitData, iterate_batches
from han_jax.training.compilation_cache import persistent, prefetch
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import eval_step, start_epoch, test_step, train_step

DATA_AXIS = "data"
PMAP_AXIS = "batch"
# TrainConfig.parallel's values: how several devices share a step.
PARALLEL_KINDS = ("sharded", "pmap")


def check_batch(batch_size: int, num_devices: int, *, field: str = "train.batch_size",
                devices: Optional[str] = None) -> None:
    """Every device takes an equal share of a batch: ``batch_size`` a multiple of ``num_devices``.

    Args:
      batch_size, num_devices: the values.
      field: the batch size's name in the message.
      devices: how the message names the devices (default ``train.num_devices=N``).

    Raises:
      ConfigError: one line naming both.
    """
    if batch_size % num_devices:
        devices = devices or f"train.num_devices={num_devices}"
        raise ConfigError(f"{field}={batch_size!r}: expected a multiple of {devices} (each device takes an equal "
                          "share of a batch)")


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The compiled steps of one specification and layout; arguments as :mod:`han_jax.training.steps`'."""

    train: Callable
    train_deterministic: Callable
    eval: Callable
    test: Callable
    start_epoch: Callable


@dataclasses.dataclass(frozen=True)
class Steps:
    """A run's steps: the compiled steps of its specification and layout, with its schedule bound.

    ``train(state, inputs, targets) -> (state, StepOutput)``; ``eval`` and ``test``
    ``(state, inputs, targets) -> StepOutput``; ``start_epoch(state, epoch) -> state``.
    """

    compiled: CompiledSteps
    devices: "Devices"
    schedule: Any  # the Schedule, placed for the layout

    def train(self, state, inputs, targets):
        return self.compiled.train(state, inputs, targets, self.schedule)

    def train_deterministic(self, state, inputs, targets):
        """``train`` with dropout off: its metrics equal ``eval``'s on the same state and batch."""
        return self.compiled.train_deterministic(state, inputs, targets, self.schedule)

    def eval(self, state, inputs, targets):
        return self.compiled.eval(state, inputs, targets)

    def test(self, state, inputs, targets):
        return self.compiled.test(state, inputs, targets)

    def start_epoch(self, state, epoch: int):
        """The epoch's learning rate (``"epoch"`` unit) written into the state; a partial accumulation dropped."""
        return self.compiled.start_epoch(state, self.devices.put_value(np.int32(epoch)), self.schedule)

    def prefetch(self, *names: str) -> None:
        """Starts loading these stored steps (``"train"``, ``"eval"``, ...) in the background (a warm start)."""
        prefetch(*(getattr(self.compiled, name) for name in names))


class Devices:
    """How the steps run over devices (see the module docstring); a frozen, hashable value.

    Attributes:
      kind: ``"single"``, ``"sharded"`` or ``"pmap"``.
      num_devices: devices that share each step (all processes together).
      device_axis: whether step outputs and the state carry a leading device axis (pmap).
      axis_name: the name the step bodies reduce over (pmap), else None.
    """

    kind: ClassVar[str]
    num_devices: int
    device_axis: ClassVar[bool] = False
    axis_name: ClassVar[Optional[str]] = None

    # -- compiling -----------------------------------------------------------------------------

    def compiled(self, spec: StepSpec) -> CompiledSteps:
        """The steps of ``spec`` compiled for this layout (once per process and layout)."""
        return _compiled_steps(spec, self)

    def steps(self, spec: StepSpec, schedule: Schedule) -> Steps:
        """The steps of ``spec`` with a run's learning-rate curve bound."""
        return Steps(self.compiled(spec), self, self.put_value(schedule))

    def _compile(self, fn: Callable, name: str, spec: StepSpec, *, kind: str, donate: bool = False) -> Callable:
        """``fn`` (a step body taking ``spec=`` and ``axis_name=``) compiled for this layout.

        ``kind`` says its arguments: ``"batch"`` (state, inputs, targets), ``"train"`` (state,
        inputs, targets, schedule) or ``"epoch"`` (state, epoch, schedule).
        """
        raise NotImplementedError

    # -- placing -------------------------------------------------------------------------------

    def put_state(self, state):
        """The state placed for the steps."""
        return state

    def local_state(self, state):
        """This process's own copy of a placed state, uncommitted as a fresh state is."""
        return state

    def checkpoint_view(self, state):
        """What orbax saves: one copy of the state (the replicated global one under a mesh)."""
        return state

    def put_value(self, value):
        """A run-time value the steps share (the epoch, the schedule), placed for them."""
        return jax.tree_util.tree_map(jnp.asarray, value)

    def first(self, tree):
        """Step outputs as one device's values (the first copy under pmap)."""
        return tree

    def process_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of ``batch_size`` that this process's devices hold."""
        check_batch(batch_size, self.num_devices)
        return slice(0, batch_size)

    def batches(self, split: SplitData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                epoch: int = 0) -> Iterator:
        """:func:`~han_jax.data.iterate_batches` laid out for the steps."""
        self.process_rows(batch_size)
        for batch in iterate_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch):
            yield self.put_batch(batch)

    def put_batch(self, batch):
        """A whole (global) host batch laid out for the steps."""
        return batch


@functools.lru_cache(maxsize=32)
def _compiled_steps(spec: StepSpec, devices: Devices) -> CompiledSteps:
    return CompiledSteps(
        train=devices._compile(train_step, "train_step", spec, kind="train", donate=True),
        train_deterministic=devices._compile(functools.partial(train_step, deterministic=True),
                                             "train_step_deterministic", spec, kind="train"),
        eval=devices._compile(eval_step, "eval_step", spec, kind="batch"),
        test=devices._compile(test_step, "test_step", spec, kind="batch"),
        start_epoch=devices._compile(start_epoch, "start_epoch", spec, kind="epoch"),
    )


def _body(fn: Callable, spec: StepSpec, kind: str, axis_name: Optional[str]) -> Callable:
    if kind == "epoch":  # start_epoch has no batch and no axis
        return functools.partial(fn, spec=spec)
    return functools.partial(fn, spec=spec, axis_name=axis_name)


@dataclasses.dataclass(frozen=True)
class SingleDevice(Devices):
    """One device, plain ``jit``; the state buffer is donated in training."""

    kind: ClassVar[str] = "single"
    num_devices: int = 1

    def _compile(self, fn, name, spec, *, kind, donate=False):
        jitted = jax.jit(_body(fn, spec, kind, None), donate_argnums=0 if donate else ())
        return persistent(jitted, name, (spec, spec.task_code))


@dataclasses.dataclass(frozen=True)
class ShardedDevices(Devices):
    """``jit`` over a one-axis mesh: batches sharded along rows, state and run-time values replicated.

    Every output (state, metrics, statistics, per-row predictions) comes back replicated,
    so each process can read all of it.
    """

    kind: ClassVar[str] = "sharded"
    num_devices: int = 1
    mesh: Optional[Mesh] = None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def _compile(self, fn, name, spec, *, kind, donate=False):
        r, rows = self.replicated, self.rows
        in_shardings = {"batch": (r, rows, rows), "train": (r, rows, rows, r), "epoch": (r, r, r)}[kind]
        jitted = jax.jit(_body(fn, spec, kind, None), in_shardings=in_shardings, out_shardings=r,
                         donate_argnums=0 if donate else ())
        return persistent(jitted, f"sharded_{name}", (spec, spec.task_code, self.mesh, DATA_AXIS))

    def put_state(self, state):
        # Through the host: every process holds the same values, and device_put of host data onto a
        # mesh that spans processes is the supported way to make them one global array.
        return jax.device_put(jax.device_get(state), self.replicated)

    def local_state(self, state):
        return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), state)

    def put_value(self, value):
        return jax.device_put(jax.device_get(value), self.replicated)

    def process_rows(self, batch_size: int) -> slice:
        check_batch(batch_size, self.num_devices)
        index = self.rows.addressable_devices_indices_map((batch_size,))
        starts = sorted(idx[0].start or 0 for idx in index.values())
        stops = sorted(batch_size if idx[0].stop is None else idx[0].stop for idx in index.values())
        if any(b != a for a, b in zip(stops[:-1], starts[1:])):
            raise RuntimeError(f"this process's devices hold rows {list(zip(starts, stops))} of a batch: expected "
                               "one contiguous block (the mesh is built in process order)")
        return slice(starts[0], stops[-1])

    def batches(self, split, batch_size, *, shuffle=False, seed=0, epoch=0):
        # Each process gathers only the rows its devices hold; JAX assembles the global batch.
        rows = self.process_rows(batch_size)
        for batch in iterate_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rows=rows):
            yield self._global(batch, batch_size)

    def put_batch(self, batch):
        batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        rows = self.process_rows(batch_size)
        return self._global(jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch), batch_size)

    def _global(self, local_batch, batch_size: int):
        sharding = self.rows
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:]), local_batch)


@dataclasses.dataclass(frozen=True)
class PmapDevices(Devices):
    """``jax.pmap`` over local devices: the state and batches carry a leading device axis; run-time values do not."""

    kind: ClassVar[str] = "pmap"
    num_devices: int = 1
    device_axis: ClassVar[bool] = True
    axis_name: ClassVar[Optional[str]] = PMAP_AXIS

    def _compile(self, fn, name, spec, *, kind, donate=False):
        in_axes = {"batch": (0, 0, 0), "train": (0, 0, 0, None), "epoch": (0, None, None)}[kind]
        return jax.pmap(_body(fn, spec, kind, PMAP_AXIS), axis_name=PMAP_AXIS, in_axes=in_axes,
                        donate_argnums=(0,) if donate else ())

    def put_state(self, state):
        return replicate(state, self.num_devices)

    def local_state(self, state):
        return unreplicate(state)

    def checkpoint_view(self, state):
        return unreplicate(state)

    def put_value(self, value):
        return jax.tree_util.tree_map(np.asarray, jax.device_get(value))

    def first(self, tree):
        return unreplicate(tree)

    def put_batch(self, batch):
        return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((self.num_devices, -1) + x.shape[1:]), batch)


def make_devices(num_devices: int = 1, parallel: str = "sharded") -> Devices:
    """The layout for ``num_devices`` sharing each step ``parallel``-ly, in this process (and its peers).

    A multi-process run always uses every device of every process, sharded.

    Raises:
      ConfigError: an unknown ``parallel``, more devices than there are, or pmap across processes.
    """
    if parallel not in PARALLEL_KINDS:
        raise ConfigError(f"train.parallel={parallel!r}: expected one of {', '.join(PARALLEL_KINDS)}")
    if jax.process_count() > 1:
        if parallel == "pmap":
            raise ConfigError(f"train.parallel='pmap' with {jax.process_count()} processes: expected 'sharded' "
                              "(multi-process runs use sharded jit)")
        if num_devices != jax.device_count():
            raise ConfigError(f"train.num_devices={num_devices}: a run over {jax.process_count()} processes uses "
                              f"all {jax.device_count()} of their devices; expected {jax.device_count()}")
        return ShardedDevices(num_devices, _mesh(jax.devices()))
    if num_devices > jax.local_device_count():
        raise ConfigError(f"train.num_devices={num_devices}: expected at most the {jax.local_device_count()} local "
                          f"{jax.default_backend()} device(s)")
    if num_devices == 1:
        return SingleDevice()
    if parallel == "pmap":
        return PmapDevices(num_devices)
    return ShardedDevices(num_devices, _mesh(jax.local_devices()[:num_devices]))


def _mesh(devices) -> Mesh:
    # Process-major order, so each process's devices hold one contiguous block of rows. Auto axis types:
    # flax linen modules carry no sharding annotations; XLA propagates the batch sharding through them.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, n: int):
    """One copy per device, laid out as pmap's own outputs are.

    Broadcasting alone leaves the copies on one device; pmap would then see its sharded
    output as a new kind of input on the second step and compile again.
    """
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)
    return jax.pmap(lambda x: x)(stacked)


def unreplicate(tree):
    """The first device's copy of a replicated pytree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)

