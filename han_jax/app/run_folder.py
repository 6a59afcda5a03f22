"""A run folder: what it holds, one writer at a time, and the checks before a resumed run changes it.

A run folder describes itself, each file written atomically (:mod:`han_jax.core.files`):

* ``config.json``: the :class:`~han_jax.config.Config` as the user asked for it;
* ``resolved.json``: what the run derived from its data (:class:`~han_jax.config.Resolved`:
  the model's source layout, the updates per epoch, the names of the tasks it trains);
* ``norm_stats.npz``: the count transform and the train statistics the inputs were normalised with;
* ``layout.json``: the sources and their feature names, in order;
* ``checkpoints/{latest,best}`` (:mod:`han_jax.training.checkpoints`), ``metrics.jsonl``,
  ``summary.json`` and the reports of ``han-jax train``.

The first four are all a run needs to be used without its training data
(:func:`han_jax.app.runs.load_run`). One process writes a folder at a time
(:func:`lock_run_dir`), and a resumed run must ask for the configuration it was trained
with (:func:`check_resume_config`); both are checked before anything in the folder changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import zipfile
from typing import Iterable, Iterator

import numpy as np

from han_jax.app.summaries import TENSORBOARD_DIR
from han_jax.app.validation import validate_config
from han_jax.config import Config, ConfigError, Resolved, config_from_dict, config_to_dict
from han_jax.core.files import atomic_write, open_regular, write_json
from han_jax.core.precision import Policy
from han_jax.data import DataError, DataLayout, Normalisation
from han_jax.training.checkpoints import CHECKPOINTS_DIR

CONFIG_FILE = "config.json"
RESOLVED_FILE = "resolved.json"
NORM_STATS_FILE = "norm_stats.npz"
LAYOUT_FILE = "layout.json"
LOCK_FILE = ".lock"
# What han-jax train writes beside them.
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.csv"
FORECAST_PLOT = "forecast.png"
CURVES_PLOT = "curves.png"
# A run folder's own files and folders: no other command writes over them unless told to (--force).
RUN_FILES = (CONFIG_FILE, RESOLVED_FILE, NORM_STATS_FILE, LAYOUT_FILE, LOCK_FILE, METRICS_FILE, SUMMARY_FILE,
             PREDICTIONS_FILE, FORECAST_PLOT, CURVES_PLOT)
RUN_FOLDERS = (CHECKPOINTS_DIR, TENSORBOARD_DIR)
# Fields a resumed run may change without --resume-override: they decide how long the loop runs and what
# it reports, not what a step computes. ``train.epochs`` is also the length of the learning-rate schedule:
# extending a run stretches the cosine decay from the resumed epoch on, which is what extending a run means.
RESUME_SAFE_FIELDS = ("train.epochs", "train.patience", "train.tensorboard", "train.score_test_each_epoch",
                      # Devices and layout change only float rounding (han_jax.training.devices); pmap's dropout
                      # draws differ.
                      "train.num_devices", "train.parallel")


# ---------------------------------------------------------------------------
# What the folder holds.
# ---------------------------------------------------------------------------


def write_run_description(run_dir: str, config: Config, resolved: Resolved, normalisation: Normalisation,
                          layout: DataLayout) -> None:
    """``config.json``, ``resolved.json``, ``norm_stats.npz`` and ``layout.json``: a run usable without its data.

    Raises:
      ValueError: the layout, the resolved source layout and the normalisation do not describe the same data.
    """
    model_layout = layout.model_layout()
    if (model_layout["daily_sources"] != tuple(resolved.daily_sources)
            or model_layout["monthly_sources"] != tuple(resolved.monthly_sources)):
        raise ValueError(f"layout {model_layout} does not match the resolved sources "
                         f"{resolved.daily_sources} / {resolved.monthly_sources}")
    for kind, names in (("daily", [n for n, _ in layout.daily]), ("monthly", [n for n, _ in layout.monthly])):
        if set(getattr(normalisation.stats, kind).mean) != set(names):
            raise ValueError(f"normalisation {kind} sources {list(getattr(normalisation.stats, kind).mean)} "
                             f"do not match the layout's {names}")
    write_json(os.path.join(run_dir, CONFIG_FILE), config_to_dict(config))
    write_json(os.path.join(run_dir, RESOLVED_FILE), config_to_dict(resolved))
    atomic_write(os.path.join(run_dir, NORM_STATS_FILE), lambda f: np.savez(f, **normalisation.to_arrays()),
                 binary=True)
    write_json(os.path.join(run_dir, LAYOUT_FILE), layout.to_dict())


def read_run_config(run_dir: str) -> tuple[Config, Resolved]:
    """The run's :class:`Config` (``config.json``) and :class:`Resolved` (``resolved.json``).

    A folder written before ``resolved.json`` existed held the resolved values inside
    ``config.json`` (the model's source layout, ``step.optim.steps_per_epoch``): they are
    read from there.

    The configuration is validated as a new one is (:func:`~han_jax.app.validation.validate_config`):
    an edited file fails here, naming the file and the field, not deep inside JAX.

    Raises:
      FileNotFoundError: no ``config.json``.
      ConfigError: a file that is not JSON or does not hold a valid configuration (the message names the
        file and the position or field).
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; expected a run folder written by 'han-jax train'")
    data = read_json(path)
    resolved_path = os.path.join(run_dir, RESOLVED_FILE)
    if os.path.exists(resolved_path):
        resolved = config_from_dict(read_json(resolved_path), Resolved, where=resolved_path)
        config = config_from_dict(data, where=path)
    else:
        optim = data.get("step", {}).get("optim", {}) if isinstance(data, dict) else {}
        steps_per_epoch = optim.pop("steps_per_epoch", 1)
        config = config_from_dict(data, where=path)
        resolved = Resolved(daily_sources=config.model.daily_sources, monthly_sources=config.model.monthly_sources,
                            steps_per_epoch=steps_per_epoch)
    try:
        validate_config(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config, resolved


def saved_data_paths(run_dir: str, data, overrides) -> list:
    """Report lines for the data folders a command reads because the run's ``config.json`` names them.

    A run folder can come from someone else: the folders it makes a command read are said,
    not taken silently.
    """
    lines = []
    for field in ("losses_dir", "monthly_csv_dir"):
        value = getattr(data, field)
        if value is not None and field not in (overrides or {}):
            lines.append(f"data: {field} {value}, as saved in {os.path.join(run_dir, CONFIG_FILE)}")
    return lines


def read_json(path: str):
    """The JSON value in ``path``; a file that is not JSON text is one line naming it and the position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected the file "
                          "han-jax wrote") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected the JSON file han-jax wrote") from None


def read_description(run_dir: str) -> tuple[Normalisation, DataLayout]:
    """The run's normalisation (``norm_stats.npz``) and layout (``layout.json``).

    Raises:
      FileNotFoundError: a folder written before runs saved them, with a message naming what is missing.
    """
    missing = [name for name in (NORM_STATS_FILE, LAYOUT_FILE) if not os.path.exists(os.path.join(run_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: no {' or '.join(missing)}; this run folder was written before han-jax saved the "
            "normalisation statistics and the data layout with a run, so it cannot predict on new data: train it "
            "again (han-jax evaluate still scores it on its own data)")
    norm_path = os.path.join(run_dir, NORM_STATS_FILE)
    try:
        with np.load(norm_path, allow_pickle=False) as arrays:
            loaded = dict(arrays)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{norm_path}: cannot be read ({type(e).__name__}); expected the statistics han-jax "
                        "wrote") from None
    normalisation = Normalisation.from_arrays(loaded, where=norm_path)
    layout_path = os.path.join(run_dir, LAYOUT_FILE)
    layout = DataLayout.from_dict(read_json(layout_path), where=layout_path)
    return normalisation, layout


def check_output_file(path: str, flag: str, *, force: bool = False) -> None:
    """Refuses, before any slow work, an output ``path`` that is a folder or a run folder's own file.

    ``han-jax predict --out`` or ``evaluate --out`` pointed at a run's ``config.json`` (or run
    inside a run folder with a relative default) would destroy the run; ``force`` is the user
    saying so on purpose. A run folder's own files are those of :data:`RUN_FILES` beside a
    ``config.json`` and everything under its :data:`RUN_FOLDERS`.

    Raises:
      FileExistsError: ``path`` is a folder, or a run's file without ``force`` (naming the run folder).
    """
    if os.path.isdir(path):
        raise FileExistsError(f"{flag} {path}: is a folder; expected the path of a file to write")
    if force:
        return
    real = os.path.realpath(path)
    folder, name = os.path.split(real)
    if name in RUN_FILES and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise FileExistsError(f"{flag} {path}: is the run folder {folder}'s own {name}; expected a path outside "
                              "the run's files (e.g. a subfolder), or --force to overwrite it")
    parent = folder
    while True:
        parent, child = os.path.split(parent)
        if child in RUN_FOLDERS and os.path.isfile(os.path.join(parent, CONFIG_FILE)):
            raise FileExistsError(f"{flag} {path}: is inside the run folder {parent}'s {child}/; expected a path "
                                  "outside the run's files, or --force")
        if not child:
            return


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
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o644)
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

    Both are compared field by field, as the user wrote them (what a run derives from its
    data follows the data's fields). A field in :data:`RESUME_SAFE_FIELDS` (how long the
    loop runs, what it reports) may change; any other changes the model, the data or the
    optimiser, so the resumed run would silently be another experiment (or fail deep in the
    checkpoint restore): it is an error unless named in ``overrides``.

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
    differ = [name for name in new if old.get(name) != new[name]]
    refused = [name for name in differ if name not in RESUME_SAFE_FIELDS and name not in overrides]
    if refused:
        changes = ", ".join(f"{name} (saved {_shown(old.get(name))}, requested {_shown(new[name])})"
                            for name in refused)
        raise ConfigError(f"--resume: {where} differs in {changes}; these change the model, data or optimiser: ask "
                          f"for the saved values, or allow them with --resume-override {','.join(refused)}")
    return differ


def _shown(value) -> str:
    return json.dumps(config_to_dict(value))
