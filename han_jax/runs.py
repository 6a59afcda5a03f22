"""Run folders: the configuration resolved against its data, checkpoints, and loading a run back.

``prepare`` turns a configuration into the one the steps run with (the model's
source layout from the data); :class:`Checkpoints` saves and restores the
``latest`` and ``best`` train states with orbax; :func:`load_checkpoint`
restores one of them for scoring.

A run folder describes itself: ``config.json`` (the whole :class:`Config`),
``norm_stats.npz`` (the count transform and the train statistics the inputs were
normalised with) and ``layout.json`` (sources and feature names, in order), each
written atomically by :func:`write_run_description`, so :func:`load_run` can
predict on new data without the training data. :func:`write_run_folder` writes a
whole folder from a state (for states that were not trained here).

A run folder has one writer at a time (:func:`lock_run_dir`), and a resumed run
must ask for the configuration it was trained with (:func:`check_resume_config`),
both checked before anything in the folder changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import uuid
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.batch import Inputs
from han_jax.config import Config, DataConfig, config_from_dict, config_to_dict
from han_jax.data import (
    DataLayout,
    Datasets,
    InferenceWindows,
    Normalisation,
    World,
    build_datasets,
    build_inference_windows,
    make_world,
    num_batches,
)
from han_jax.precision import Policy
from han_jax.steps import TrainState, create_train_state, jit_forward, with_flat_accumulator, with_tree_accumulator
from han_jax.validation import ConfigError

CONFIG_FILE = "config.json"
NORM_STATS_FILE = "norm_stats.npz"
LAYOUT_FILE = "layout.json"
CHECKPOINTS = ("best", "latest")
LOCK_FILE = ".lock"
# Test hook (tests/test_run_safety.py): EPOCH, or EPOCH:best, kills the process with SIGKILL in the middle of
# that epoch's ``latest`` (or ``best``) checkpoint save; see Checkpoints.save.
KILL_IN_SAVE_ENV = "HAN_JAX_TEST_KILL_IN_SAVE"
# Fields a resumed run may change without --resume-override: they decide how long the loop runs and what
# it reports, not what a step computes. ``train.epochs`` is also the length of the learning-rate schedule:
# extending a run stretches the cosine decay from the resumed epoch on, which is what extending a run means.
RESUME_SAFE_FIELDS = ("train.epochs", "train.patience", "train.tensorboard", "train.score_test_each_epoch",
                      # Devices and layout change only float rounding (han_jax.parallel); pmap's dropout draws differ.
                      "train.num_devices", "train.parallel")
# Set by ``prepare`` from fields that are compared themselves (the data, the batch size, the accumulation).
RESUME_DERIVED_FIELDS = ("step.optim.steps_per_epoch",)
# DataConfig fields that shape a model's inputs: new data must be cut and scaled as the run's was.
WINDOW_FIELDS = ("daily_seq_len", "monthly_seq_len", "prediction_horizon", "count_transform", "missing_value",
                 "daily_sources", "monthly_sources", "daily_forecast_targets", "daily_forecast_horizon")


def prepare(config: Config, log=None) -> tuple[Datasets, Config]:
    """Builds the datasets and the configuration the steps run with.

    The model's source layout comes from the data, and the optimiser's updates
    per epoch from the training split and the batch size.
    """
    datasets = build_datasets(make_world(config.data), config.data)
    if log is not None:
        for line in datasets.report:
            log(f"data: {line}")
    model = dataclasses.replace(config.model, **datasets.model_layout())
    n_train_batches = num_batches(datasets.train, config.train.batch_size)
    optim = config.step.optim
    optim = dataclasses.replace(optim, steps_per_epoch=max(1, n_train_batches // optim.accumulation_steps))
    config = config.replace(model=model, step=dataclasses.replace(config.step, optim=optim))
    if log is not None:
        log(f"data: train/val/test anchors {len(datasets.train)}/{len(datasets.val)}/{len(datasets.test)}; "
            f"daily {model.daily_sources}; monthly {model.monthly_sources}")
    return datasets, config


def _accumulator_is_trees(metadata) -> bool:
    """Whether a checkpoint's tree metadata holds ``MultiSteps``' accumulated gradients as parameter trees.

    han-jax wrote them so before :func:`~han_jax.steps.optimizer_view` (one flat vector per group since);
    the metadata says which before any array is read.
    """
    try:
        acc = metadata["state"]["opt_state"]["inner_state"]["acc_grads"]
    except (KeyError, TypeError):
        return False
    return isinstance(acc, dict) and isinstance(acc.get("model"), dict)


class Checkpoints:
    """Latest and best train states with orbax, plus the loop's JSON metadata.

    Crash safety: orbax writes a step into a temporary folder and renames it into
    place when complete, and drops the previous step (``max_to_keep=1``) only
    after that; a writing manager deletes temporary folders left by an
    interrupted save when it opens, so ``latest_step`` is always a complete
    checkpoint. The loop saves ``latest`` before ``best``, so ``best`` can only lag
    ``latest`` by the epoch being saved: :meth:`resume` repairs that case.

    In a multi-process run every process calls every method: orbax saves the
    replicated global state collectively (each array once) and every process
    restores its own copy. ``place`` turns a restored (local) state into
    what :meth:`save` is given in this layout (:mod:`han_jax.parallel`), for
    :meth:`resume`'s save of it.
    """

    def __init__(self, run_dir: str, create: bool = True, place: Callable = lambda state: state):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._place = place
        # Synchronous saves: the loop waits for each save anyway (exact resume needs it on disk).
        # Read-only managers get the values orbax would otherwise reset (with a warning each).
        opts = ocp.CheckpointManagerOptions(max_to_keep=1 if create else None, create=create,
                                            save_interval_steps=1 if create else 0,
                                            enable_async_checkpointing=False, read_only=not create,
                                            cleanup_tmp_directories=create)
        root = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        # The handlers named up front, so a fresh manager can read a checkpoint's tree metadata (restore).
        def manager(folder):
            return ocp.CheckpointManager(folder, options=opts, item_handlers={
                "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

        self.latest = manager(os.path.join(root, "latest"))
        self.best = manager(os.path.join(root, "best"))

    def save(self, manager, epoch: int, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        with _test_kill_in_save("latest" if manager is self.latest else "best", epoch):
            saved = manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()
        if not saved:  # orbax skips, silently, a step at or below the newest one on disk
            raise RuntimeError(f"{manager.directory}: epoch {epoch} not saved; it holds epoch {manager.latest_step()}")

    def restore(self, manager, template: TrainState):
        ocp = self._ocp
        step = manager.latest_step()
        if step is None:
            return None, None
        # Each process restores its own whole copy onto its first device, whatever layout saved it (one
        # device, a mesh, several processes): without a sharding orbax would ask for the saving topology.
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def restore(template):
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                                              template)
            return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))

        if _accumulator_is_trees(manager.metadata(step).item_metadata):
            # A checkpoint from before the optimiser saw flat group vectors (steps.optimizer_view):
            # read it in its own layout, then convert it (lossless). Any other mismatch is orbax's error.
            out = restore(jax.eval_shape(with_tree_accumulator, template))
            convert = with_flat_accumulator
        else:
            out = restore(template)
            convert = None
        # orbax hands back device-committed arrays; a fresh state is uncommitted, and jit
        # keys its cache on that, so a resumed run would recompile every step. Hand back
        # uncommitted arrays, exactly as create_train_state does.
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), out.state)
        return (state if convert is None else convert(state)), out.meta

    def resume(self, template: TrainState, log=print):
        """The ``latest`` state and metadata, with ``best`` brought up to date first.

        A run killed between saving an improved epoch's ``latest`` and its ``best``
        resumes after that epoch, yet ``best`` holds an older one: the final scoring
        would then read another state than ``best_epoch`` names. That epoch's state
        is the restored one, so it is saved as ``best`` again.
        """
        state, meta = self.restore(self.latest, template)
        if state is not None and meta["best_epoch"] == meta["epoch"] and self.best.latest_step() != meta["epoch"]:
            log(f"checkpoints/best: completing epoch {meta['epoch']}'s save, interrupted before")
            self.save(self.best, meta["epoch"], self._place(state), meta)
        return state, meta

    def close(self):
        self.latest.close()
        self.best.close()


@contextlib.contextmanager
def _test_kill_in_save(which: str, epoch: int) -> Iterator[None]:
    """Test hook: with ``HAN_JAX_TEST_KILL_IN_SAVE`` naming this save, SIGKILL the process in its middle.

    ``EPOCH`` names that epoch's ``latest`` save, ``EPOCH:best`` its ``best`` save.
    The kill comes after orbax has written the whole step into its temporary
    folder and before the rename that commits it: the last moment a crash or
    ``kill -9`` can leave a save unfinished. ``tests/test_run_safety.py`` uses it
    to check that ``--resume`` then starts from the previous complete checkpoint.
    Unset (always, outside that test) it does nothing.
    """
    wanted = os.environ.get(KILL_IN_SAVE_ENV)
    if wanted != (str(epoch) if which == "latest" else f"{epoch}:{which}"):
        yield
        return
    rename = os.rename

    def rename_or_die(src, dst, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in os.fspath(src):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.rename = rename_or_die
    try:
        yield
    finally:
        os.rename = rename


def zero_inputs(config: Config, batch_size: int = 1) -> Inputs:
    """An all-unobserved batch of ``config``'s input shapes (only its shapes matter, e.g. to build a state)."""
    d, m = config.data.daily_seq_len, config.data.monthly_seq_len

    def block(layout, length):
        return ({n: np.zeros((batch_size, length, f), np.float32) for n, f in layout},
                {n: np.zeros((batch_size, length, f), bool) for n, f in layout})

    df, dm = block(config.model.daily_sources, d)
    mf, mm = block(config.model.monthly_sources, m)
    return Inputs(daily_features=df, daily_masks=dm, monthly_features=mf, monthly_masks=mm,
                  month_boundaries=np.zeros((batch_size, m, 2), np.int32))


def abstract_state(config: Config):
    """The shapes and dtypes of ``config``'s train state, without computing (or compiling) an initialisation."""
    return jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(config.train.seed), config,
                                                     zero_inputs(config)))


def load_checkpoint(run_dir: str, which: str, config: Config, datasets: Optional[Datasets] = None) -> TrainState:
    """The ``best`` or ``latest`` train state of a run folder, restored into ``config``'s structure.

    ``datasets`` is not needed (the structure comes from ``config`` alone); kept for callers that pass it.
    """
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint {which!r}: expected 'best' or 'latest'")
    ckpt = Checkpoints(run_dir, create=False)
    try:
        state, _ = ckpt.restore(getattr(ckpt, which), abstract_state(config))
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"{os.path.join(run_dir, 'checkpoints', which)}: no checkpoint")
    return state


def checkpoint_epoch(run_dir: str, which: str = "latest") -> Optional[int]:
    """The epoch of the folder's complete ``latest`` (or ``best``) checkpoint; None if there is none.

    A save interrupted before orbax committed it does not count: ``--resume`` starts after this epoch.
    """
    if not os.path.isdir(os.path.join(run_dir, "checkpoints", which)):
        return None
    ckpt = Checkpoints(run_dir, create=False)
    try:
        return getattr(ckpt, which).latest_step()
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------
# Self-describing run folders.
# ---------------------------------------------------------------------------


def atomic_write(path: str, write: Callable, *, binary: bool = False) -> None:
    """Writes a file through ``write(file)`` into a temporary file beside it, then renames it into place.

    A reader never sees a half-written file, and an interrupted write leaves the old one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Beside the target (os.replace is atomic within a file system); opened as open() does,
    # so the file gets the usual permissions (mkstemp's are owner-only).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, data) -> None:
    """``data`` as indented JSON, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: json.dump(data, f, indent=1))


# ---------------------------------------------------------------------------
# One writer per run folder.
# ---------------------------------------------------------------------------


class RunLocked(Exception):
    """Another process is writing the run folder. The message is one line naming the folder and its pid."""


@contextlib.contextmanager
def lock_run_dir(run_dir: str, command: str) -> Iterator[None]:
    """Holds the run folder's lock file, ``run_dir/.lock``, for the block: one writer per run folder.

    Two writers would interleave ``metrics.jsonl``, overwrite each other's
    ``config.json`` and race on the checkpoints. The lock is ``flock`` on the open
    file, which the OS drops when its process exits or is killed: a lock file left
    by a dead process is free and simply taken over, with no guessing from pids.
    The file holds the holder's pid and ``command`` for the message only. It is
    removed on release, while still held; an acquirer that finds the file it
    locked unlinked meanwhile tries again on the new one. Readers (``evaluate``,
    ``predict``) do not take it.

    Args:
      run_dir: the folder; created if absent, and removed again on release if
        it is then empty (a run that failed its checks leaves nothing behind).
      command: what the holder is, e.g. ``"han-jax train"``.

    Raises:
      RunLocked: another process holds the folder.
    """
    path = os.path.join(run_dir, LOCK_FILE)
    created = not os.path.isdir(run_dir)
    fd = _acquire_lock(path, run_dir)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the folder is a run now
                os.rmdir(run_dir)


def _acquire_lock(path: str, run_dir: str) -> int:
    """An open, flock-ed descriptor of the lock file at ``path``, or :class:`RunLocked`."""
    while True:
        os.makedirs(run_dir, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a releasing holder removed the folder it had created: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split(maxsplit=1)
            os.close(fd)
            who = f"pid {holder[0]} ({holder[1].strip()})" if len(holder) == 2 else "another process"
            raise RunLocked(f"run folder {run_dir} is in use by {who}; wait for it or use another --run-dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed: lock the one at the path now


# ---------------------------------------------------------------------------
# Resuming: the saved configuration against the requested one.
# ---------------------------------------------------------------------------


def read_run_config(run_dir: str) -> Config:
    """The :class:`Config` of a run folder's ``config.json``."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; expected a run folder written by 'han-jax train'")
    with open(path) as f:
        return config_from_dict(json.load(f), where=path)


def flatten_config(node, prefix: str = "") -> dict:
    """Every field of a config tree by dotted name: ``{"model.d_model": 16, "step.optim.learning_rate": ...}``."""
    fields = {}
    for field in dataclasses.fields(node):
        value, name = getattr(node, field.name), prefix + field.name
        if dataclasses.is_dataclass(value) and not isinstance(value, Policy):
            fields.update(flatten_config(value, name + "."))
        else:
            fields[name] = value
    return fields


def check_resume_config(saved: Config, requested: Config, overrides: Iterable[str] = (), *,
                        where: str = CONFIG_FILE) -> list:
    """Checks that a resumed run asks for the configuration its checkpoint was trained with.

    Both are compared field by field as ``train`` resolves them (:func:`prepare`).
    A field in :data:`RESUME_SAFE_FIELDS` (how long the loop runs, what it
    reports) may change; any other changes the model, the data or the optimiser,
    so the resumed run would silently be another experiment (or fail deep in the
    checkpoint restore): it is an error unless named in ``overrides``. The
    fields :func:`prepare` derives (:data:`RESUME_DERIVED_FIELDS`) follow the
    fields they come from.

    Args:
      saved: the run folder's configuration (:func:`read_run_config`).
      requested: the configuration asked for now.
      overrides: dotted field names allowed to differ (``--resume-override``).
      where: the saved file, for the message.

    Returns:
      The dotted names of the fields that differ (all allowed), for the log.

    Raises:
      ConfigError: one line listing every refused field with its saved and
        requested value, or naming an override that is no field.
    """
    old, new = flatten_config(saved), flatten_config(requested)
    unknown = [name for name in overrides if name not in new]
    if unknown:
        raise ConfigError(f"--resume-override {','.join(unknown)}: no such configuration field; expected dotted "
                          "names such as step.optim.learning_rate")
    differ = [name for name in new if name not in RESUME_DERIVED_FIELDS and old[name] != new[name]]
    refused = [name for name in differ if name not in RESUME_SAFE_FIELDS and name not in overrides]
    if refused:
        changes = ", ".join(f"{name} (saved {_shown(old[name])}, requested {_shown(new[name])})" for name in refused)
        raise ConfigError(f"--resume: {where} differs in {changes}; these change the model, data or optimiser: ask "
                          f"for the saved values, or allow them with --resume-override {','.join(refused)}")
    return differ


def _shown(value) -> str:
    return json.dumps(config_to_dict(value))


def write_run_description(run_dir: str, config: Config, normalisation: Normalisation, layout: DataLayout) -> None:
    """``config.json``, ``norm_stats.npz`` and ``layout.json``: what a run needs to be used without its data.

    Args:
      run_dir: the run folder (created if absent).
      config: the configuration the steps ran with (model layout resolved).
      normalisation: the count transform and train statistics of the run's inputs.
      layout: the sources and feature names the model reads, in order; must agree with ``config.model``.
    """
    model_layout = layout.model_layout()
    if (model_layout["daily_sources"] != tuple(config.model.daily_sources)
            or model_layout["monthly_sources"] != tuple(config.model.monthly_sources)):
        raise ValueError(f"layout {model_layout} does not match the model's sources "
                         f"{config.model.daily_sources} / {config.model.monthly_sources}")
    for kind, names in (("daily", [n for n, _ in layout.daily]), ("monthly", [n for n, _ in layout.monthly])):
        if set(getattr(normalisation.stats, kind).mean) != set(names):
            raise ValueError(f"normalisation {kind} sources {list(getattr(normalisation.stats, kind).mean)} "
                             f"do not match the layout's {names}")
    write_json(os.path.join(run_dir, CONFIG_FILE), config_to_dict(config))
    atomic_write(os.path.join(run_dir, NORM_STATS_FILE), lambda f: np.savez(f, **normalisation.to_arrays()),
                 binary=True)
    write_json(os.path.join(run_dir, LAYOUT_FILE), layout.to_dict())


def write_run_folder(run_dir: str, config: Config, state: TrainState, normalisation: Normalisation,
                     layout: DataLayout, *, meta: Optional[dict] = None) -> None:
    """A complete run folder from a state: the description files, and the state as ``best`` and ``latest``.

    For states that were not trained by ``han-jax train`` (e.g. converted from
    another framework); :func:`load_run`, ``han-jax predict`` and ``han-jax
    evaluate`` then read the folder as any other.

    Args:
      run_dir: the folder to write; it must hold no checkpoints yet.
      config: the state's configuration.
      state: a host (unreplicated) train state of ``config``'s structure.
      normalisation, layout: as for :func:`write_run_description`.
      meta: JSON metadata stored with the checkpoints (default ``{"epoch": 0}``).
    """
    if os.path.exists(os.path.join(run_dir, "checkpoints")):
        raise FileExistsError(f"{os.path.join(run_dir, 'checkpoints')}: already exists; expected a new run folder")
    write_run_description(run_dir, config, normalisation, layout)
    ckpt = Checkpoints(run_dir)
    try:
        for manager in (ckpt.latest, ckpt.best):
            ckpt.save(manager, 0, state, meta if meta is not None else {"epoch": 0})
    finally:
        ckpt.close()


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A run folder loaded for use: configuration, state, and the normalisation and layout of its inputs.

    Attributes:
      run_dir: the folder.
      checkpoint: which checkpoint ``state`` is (``"best"`` or ``"latest"``).
      config: the whole configuration (``config.json``).
      state: the :class:`~han_jax.steps.TrainState` of that checkpoint.
      normalisation: the count transform and train statistics (``norm_stats.npz``).
      layout: the sources and feature names the model reads (``layout.json``).
    """

    run_dir: str
    checkpoint: str
    config: Config
    state: TrainState
    normalisation: Normalisation
    layout: DataLayout

    def forward(self, inputs: Inputs) -> dict:
        """The model's output dict for a batch (dropout off; jitted, compiled once per configuration)."""
        return jit_forward(self.config)(self.state.params, inputs)

    def windows(self, world: Optional[World] = None, *, data: Optional[DataConfig] = None, date_from=None,
                date_to=None) -> InferenceWindows:
        """Anchors of new data normalised with the run's statistics (:func:`han_jax.data.build_inference_windows`).

        Args:
          world: the data; default ``make_world(data)``.
          data: a ``DataConfig`` saying where the data is (default the run's); the fields that shape
            the inputs (``WINDOW_FIELDS``) must be the run's.
          date_from, date_to: the anchor range (``YYYY-MM-DD``); default the data's last day.
        """
        data = self.config.data if data is None else data
        for name in WINDOW_FIELDS:
            if getattr(data, name) != getattr(self.config.data, name):
                raise ConfigError(f"data.{name}={getattr(data, name)!r} differs from the run's "
                                 f"{getattr(self.config.data, name)!r}; expected the inputs the model was trained on")
        world = make_world(data) if world is None else world
        return build_inference_windows(world, data, self.normalisation, self.layout, date_from, date_to)

    def predict(self, world: Optional[World] = None, *, data: Optional[DataConfig] = None, date_from=None,
                date_to=None, batch_size: Optional[int] = None):
        """One row per anchor of new data: predictions in the data's units (:mod:`han_jax.predict`).

        Arguments as :meth:`windows`; ``batch_size`` default the run's.

        Returns:
          A :class:`han_jax.predict.PredictionTable`.
        """
        from han_jax.predict import predict_windows

        windows = self.windows(world, data=data, date_from=date_from, date_to=date_to)
        return predict_windows(self, windows, batch_size=batch_size)


def load_run(run_dir: str, checkpoint: str = "best") -> Run:
    """Loads a run folder written by ``han-jax train`` (or :func:`write_run_folder`).

    Args:
      run_dir: the folder.
      checkpoint: ``"best"`` or ``"latest"``.

    Returns:
      The :class:`Run`.

    Raises:
      FileNotFoundError: a file is missing; a folder written before runs saved their
        normalisation and layout gets a message naming what is missing.
      ValueError: a file that does not describe the same model as the others.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint {checkpoint!r}: expected 'best' or 'latest'")
    config = read_run_config(run_dir)
    missing = [name for name in (NORM_STATS_FILE, LAYOUT_FILE) if not os.path.exists(os.path.join(run_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: no {' or '.join(missing)}; this run folder was written before han-jax saved the "
            "normalisation statistics and the data layout with a run, so it cannot predict on new data: train it "
            "again (han-jax evaluate still scores it on its own data)")
    with np.load(os.path.join(run_dir, NORM_STATS_FILE), allow_pickle=False) as arrays:
        normalisation = Normalisation.from_arrays(dict(arrays), where=os.path.join(run_dir, NORM_STATS_FILE))
    with open(os.path.join(run_dir, LAYOUT_FILE)) as f:
        layout = DataLayout.from_dict(json.load(f), where=os.path.join(run_dir, LAYOUT_FILE))
    model_layout = layout.model_layout()
    if (model_layout["daily_sources"] != tuple(config.model.daily_sources)
            or model_layout["monthly_sources"] != tuple(config.model.monthly_sources)):
        raise ValueError(f"{os.path.join(run_dir, LAYOUT_FILE)}: sources {model_layout} differ from "
                         f"{CONFIG_FILE}'s model {config.model.daily_sources} / {config.model.monthly_sources}")
    state = load_checkpoint(run_dir, checkpoint, config)
    return Run(run_dir, checkpoint, config, state, normalisation, layout)
