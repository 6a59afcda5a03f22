"""A configuration resolved against its data, and a saved run loaded back for use.

:func:`prepare` builds a configuration's datasets and what the run derives from them
(:class:`~han_jax.config.Resolved`). :func:`load_run` reads a run folder
(:mod:`han_jax.app.run_folder`) into a :class:`Run`: its configuration, the step
specification, the restored state and the normalisation and layout its inputs need, so it
can forward or predict on new data without its training data. :func:`write_run_folder`
writes a whole folder for a state that was not trained here (e.g. imported from PyTorch).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from han_jax import tasks as task_registry
from han_jax.app.run_folder import CONFIG_FILE, LAYOUT_FILE, read_description, read_run_config, write_run_description
from han_jax.config import Config, ConfigError, DataConfig, Resolved
from han_jax.core.batch import Inputs
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
from han_jax.training.checkpoints import CHECKPOINTS, CHECKPOINTS_DIR, Checkpoints, load_checkpoint
from han_jax.training.spec import StepSpec
from han_jax.training.steps import TrainState, jit_forward

# DataConfig fields that shape a model's inputs: new data must be cut and scaled as the run's was.
WINDOW_FIELDS = ("daily_seq_len", "monthly_seq_len", "prediction_horizon", "count_transform", "missing_value",
                 "daily_sources", "monthly_sources", "daily_forecast_targets", "daily_forecast_horizon")


def prepare(config: Config, log=None, world: Optional[World] = None) -> tuple[Datasets, Resolved]:
    """Builds the datasets of ``config.data`` (of ``world``, when given) and what the run derives from them.

    The model's source layout is the data's, and the optimiser's updates per epoch come
    from the training split and the batch size.

    Raises:
      ConfigError: ``config.model`` names a source layout other than the data's.
    """
    datasets = build_datasets(make_world(config.data) if world is None else world, config.data)
    if log is not None:
        for line in datasets.report:
            log(f"data: {line}")
    n_train_batches = num_batches(datasets.train, config.train.batch_size)
    resolved = Resolved(daily_sources=datasets.daily_sources, monthly_sources=datasets.monthly_sources,
                        steps_per_epoch=max(1, n_train_batches // config.step.optim.accumulation_steps),
                        tasks=task_registry.names())
    resolved.model(config.model)  # a model layout of the user's own must be the data's
    if log is not None:
        log(f"data: train/val/test anchors {len(datasets.train)}/{len(datasets.val)}/{len(datasets.test)}; "
            f"daily {resolved.daily_sources}; monthly {resolved.monthly_sources}")
    return datasets, resolved


def write_run_folder(run_dir: str, config: Config, resolved: Resolved, state: TrainState,
                     normalisation: Normalisation, layout: DataLayout, *, meta: Optional[dict] = None) -> None:
    """A complete run folder from a state: the description files, and the state as ``best`` and ``latest``.

    For states that were not trained by ``han-jax train`` (e.g. converted from another
    framework); :func:`load_run`, ``han-jax predict`` and ``han-jax evaluate`` then read the
    folder as any other.

    Args:
      run_dir: the folder to write; it must hold no checkpoints yet.
      config, resolved: the state's configuration and data-derived values.
      state: a host (unreplicated) train state of their structure.
      normalisation, layout: as for :func:`~han_jax.app.run_folder.write_run_description`.
      meta: JSON metadata stored with the checkpoints (default ``{"epoch": 0}``).
    """
    if os.path.exists(os.path.join(run_dir, CHECKPOINTS_DIR)):
        raise FileExistsError(f"{os.path.join(run_dir, CHECKPOINTS_DIR)}: already exists; expected a new run folder")
    write_run_description(run_dir, config, resolved, normalisation, layout)
    ckpt = Checkpoints(run_dir)
    try:
        for manager in (ckpt.latest, ckpt.best):
            ckpt.save(manager, 0, state, meta if meta is not None else {"epoch": 0})
    finally:
        ckpt.close()


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A run folder loaded for use: configuration, specification, state, and how its inputs are made.

    Attributes:
      run_dir: the folder.
      checkpoint: which checkpoint ``state`` is (``"best"`` or ``"latest"``).
      config: the configuration (``config.json``).
      resolved: what the run derived from its data (``resolved.json``).
      spec: the specification its steps compile against.
      state: the :class:`~han_jax.training.steps.TrainState` of that checkpoint.
      normalisation: the count transform and train statistics (``norm_stats.npz``).
      layout: the sources and feature names the model reads (``layout.json``).
    """

    run_dir: str
    checkpoint: str
    config: Config
    resolved: Resolved
    spec: StepSpec
    state: TrainState
    normalisation: Normalisation
    layout: DataLayout

    def forward(self, inputs: Inputs) -> dict:
        """The model's output dict for a batch (dropout off; jitted, compiled once per architecture)."""
        return jit_forward(self.spec)(self.state.params, inputs)

    def windows(self, world: Optional[World] = None, *, data: Optional[DataConfig] = None, date_from=None,
                date_to=None) -> InferenceWindows:
        """Anchors of new data normalised with the run's statistics (:func:`han_jax.data.build_inference_windows`).

        Args:
          world: the data; default ``make_world(data)``.
          data: a ``DataConfig`` saying where the data is (default the run's); the fields that shape
            the inputs (:data:`WINDOW_FIELDS`) must be the run's.
          date_from, date_to: the anchor range (``YYYY-MM-DD``); default the data's last day.

        Raises:
          ConfigError: ``data`` cuts or scales the inputs otherwise than the run did.
        """
        data = self.config.data if data is None else data
        for name in WINDOW_FIELDS:
            if getattr(data, name) != getattr(self.config.data, name):
                raise ConfigError(f"data.{name}={getattr(data, name)!r} differs from the run's "
                                  f"{getattr(self.config.data, name)!r}; expected the inputs the model was trained on")
        world = make_world(data) if world is None else world
        return build_inference_windows(world, data, self.normalisation, self.layout, date_from, date_to)


def load_run(run_dir: str, checkpoint: str = "best") -> Run:
    """Loads a run folder written by ``han-jax train`` (or :func:`write_run_folder`).

    Raises:
      FileNotFoundError: a file is missing; a folder written before runs saved their
        normalisation and layout gets a message naming what is missing.
      ValueError: a file that does not describe the same model as the others.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint {checkpoint!r}: expected one of {CHECKPOINTS}")
    config, resolved = read_run_config(run_dir)
    normalisation, layout = read_description(run_dir)
    model_layout = layout.model_layout()
    if (model_layout["daily_sources"] != tuple(resolved.daily_sources)
            or model_layout["monthly_sources"] != tuple(resolved.monthly_sources)):
        raise ValueError(f"{os.path.join(run_dir, LAYOUT_FILE)}: sources {model_layout} differ from "
                         f"{CONFIG_FILE}'s model {resolved.daily_sources} / {resolved.monthly_sources}")
    spec = StepSpec.of(config, resolved)
    state = load_checkpoint(run_dir, checkpoint, spec, config.data.daily_seq_len, config.data.monthly_seq_len)
    return Run(run_dir, checkpoint, config, resolved, spec, state, normalisation, layout)
