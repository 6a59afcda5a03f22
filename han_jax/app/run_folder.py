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
from typing import Iterable, Iterator

import numpy as np

from han_jax.config import Config, ConfigError, Resolved, config_from_dict, config_to_dict
from han_jax.core.files import atomic_write, write_json
from han_jax.core.precision import Policy
from han_jax.data import DataLayout, Normalisation

CONFIG_FILE = "config.json"
RESOLVED_FILE = "resolved.json"
NORM_STATS_FILE = "norm_stats.npz"
LAYOUT_FILE = "layout.json"
LOCK_FILE = ".lock"
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

    Raises:
      FileNotFoundError: no ``config.json``.
      ValueError: a file that does not hold a configuration (the message names the file and field).
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; expected a run folder written by 'han-jax train'")
    with open(path) as f:
        data = json.load(f)
    resolved_path = os.path.join(run_dir, RESOLVED_FILE)
    if os.path.exists(resolved_path):
        with open(resolved_path) as f:
            resolved = config_from_dict(json.load(f), Resolved, where=resolved_path)
        return config_from_dict(data, where=path), resolved
    optim = data.get("step", {}).get("optim", {}) if isinstance(data, dict) else {}
    steps_per_epoch = optim.pop("steps_per_epoch", 1)
    config = config_from_dict(data, where=path)
    resolved = Resolved(daily_sources=config.model.daily_sources, monthly_sources=config.model.monthly_sources,
                        steps_per_epoch=steps_per_epoch)
    return config, resolved


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
    with np.load(os.path.join(run_dir, NORM_STATS_FILE), allow_pickle=False) as arrays:
        normalisation = Normalisation.from_arrays(dict(arrays), where=os.path.join(run_dir, NORM_STATS_FILE))
    with open(os.path.join(run_dir, LAYOUT_FILE)) as f:
        layout = DataLayout.from_dict(json.load(f), where=os.path.join(run_dir, LAYOUT_FILE))
    return normalisation, layout


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
