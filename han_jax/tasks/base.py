"""What a task is: the one interface every task module implements, and the helpers they share.

A :class:`Task` owns everything that is specific to one head of the multi-task model,
so that adding a task touches one module (``docs/adding_a_task.md``):

* which model outputs it reads (``outputs``) and its initial Kendall log-variance (``prior``);
* its loss, split in two so that a whole split can be scored exactly in pieces:
  :meth:`Task.statistics` reduces a batch to additive sums, counts and
  :class:`~han_jax.core.reductions.Moments`, and :meth:`Task.finalize` applies the
  original's floors, penalties and fallbacks once;
* its interpretable metrics, computed from the same statistics (:meth:`Task.metrics`),
  and the count each mean is weighted by (:meth:`Task.count_key`);
* its naive baselines, fitted on the training split only, and its skill against them;
* its per-row predictions (:meth:`Task.predict`, inside ``jit``) and their columns in
  the data's units (:meth:`Task.columns`), a line of the printed summary and a plot panel.

Tasks are frozen dataclasses without fields: hashable, equal by type and with a stable
``repr``, so a tuple of them is part of the static step specification and of the
compilation-cache key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import jax
import numpy as np

from han_jax.config import LossConfig, ModelConfig
from han_jax.core.batch import Targets

Array = jax.Array
Metrics = dict  # str -> float | None on the host


@dataclasses.dataclass(frozen=True)
class TableContext:
    """What turns predictions into the data's units: the run's model, losses, normalisation and layout."""

    model: ModelConfig
    loss: LossConfig
    normalisation: Any  # han_jax.data.Normalisation
    layout: Any  # han_jax.data.DataLayout
    prediction_horizon: int = 1


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the multi-task head (see the module docstring). Subclasses set the class attributes.

    Attributes:
      name: the task's name: the key of its loss, log-variance and metrics (``loss/<name>``).
      outputs: the model outputs the task reads; it is scored on a batch only when all are present.
      optional_outputs: outputs it reads when the model produces them (a han-jax option's head).
      prior: the initial log-variance of the Kendall weighting.
      watch_collapse: the training loop warns when this task's loss collapses below 1e-3.
      metric_counts: each mean-valued metric of :meth:`metrics` -> the count it is computed over
        (on the host a metric whose count is 0 is None, not 0).
      table_rows: the rows of the split table this task contributes, in order (metrics and baselines).
      backtest_rows: the rows a backtest scores the forecast made at an origin on: ``"month"``, every
        day of the month after the origin (the forecast held); ``"month_once"``, its first day only
        (a monthly target: one outcome a month); ``"origin"``, the origin's own window, whose targets
        already lie in the month after (the forecast head's next month).
      headline_score: the proper score the split table and the backtest plot show for every
        baseline (lower is better); the JSON reports hold them all.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)  # every task a frozen value, like its base

    name: ClassVar[str]
    outputs: ClassVar[tuple] = ()
    optional_outputs: ClassVar[tuple] = ()
    prior: ClassVar[float] = 0.0
    watch_collapse: ClassVar[bool] = False
    metric_counts: ClassVar[Mapping[str, str]] = {}
    table_rows: ClassVar[tuple] = ()
    backtest_rows: ClassVar[str] = "month"
    headline_score: ClassVar[Optional[str]] = None

    # -- the loss --------------------------------------------------------------------------------

    def statistics(self, outputs: Mapping[str, Array], targets: Targets, row: Array, config: LossConfig,
                   axis_name: Optional[str]) -> dict:
        """One batch's additive statistics: everything the loss and the metrics need from its rows.

        Args:
          outputs: the model outputs this task reads, f32, NaN already replaced as the original does.
          targets: the batch's targets.
          row: bool [B], the rows to reduce over (real rows, or one observation-rate stratum).
          config: the loss options.
          axis_name: the pmap axis (reductions go through :mod:`han_jax.core.reductions`).

        Returns:
          ``{name: array or Moments}``; the key set records the static branch taken (targets
          present or absent), so only statistics of the same branch are ever merged.
        """
        raise NotImplementedError

    def finalize(self, stats: Mapping, config: LossConfig) -> tuple[Array, Array]:
        """``(loss, n_valid)`` from (merged) statistics; ``n_valid`` is 0 where the loss fell back."""
        raise NotImplementedError

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self, stats: Mapping, model: ModelConfig) -> dict:
        """The task's interpretable metrics and their counts from (merged) statistics; jax or numpy."""
        return {}

    def count_key(self, key: str) -> Optional[str]:
        """The count a mean-valued metric of this task is computed over (None: not one of its means)."""
        return self.metric_counts.get(key)

    # -- baselines -------------------------------------------------------------------------------

    def fit_baseline(self, train: Targets, model: ModelConfig, loss: LossConfig) -> Any:
        """The naive forecaster(s), fitted on the training split's targets only (None: no baseline)."""
        return None

    def baseline_metrics(self, fitted: Any, targets: Targets, model: ModelConfig, loss: LossConfig) -> Metrics:
        """The baselines' errors on a split's targets, on the rows the model's metrics use (``baseline/...``)."""
        return {}

    def skill(self, metrics: Mapping) -> Metrics:
        """``skill/<name>...``: 1 - model error / best baseline error, from a split's metrics and baselines."""
        return {}

    # -- predictions -----------------------------------------------------------------------------

    def predict(self, outputs: Mapping[str, Array], model: ModelConfig, loss: LossConfig) -> dict:
        """Per-row predictions of the anchor (the window's last month), f32 arrays with a leading row axis."""
        return {}

    def columns(self, predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                ctx: TableContext) -> dict:
        """Prediction-table columns in the data's units, with the actual values beside them (NaN: none)."""
        return {}

    def describe(self, columns: Mapping[str, np.ndarray], i: int) -> tuple:
        """``(inline, lines)`` for row ``i`` of the printed summary: a fragment of its first line, extra lines."""
        return None, []

    def panels(self, columns: Mapping[str, np.ndarray]) -> list:
        """Plot panels of ``forecast.png``: callables ``draw(ax, columns, dates, marker)``, one axis each."""
        return []

    def table_lines(self, final: Mapping[str, Mapping], splits: Sequence[str], width: int) -> list:
        """Lines the split table prints after its rows (e.g. a per-source breakdown)."""
        return []

    # -- proper scores (host, numpy) -------------------------------------------------------------

    def baseline_forecasts(self, train: Targets, targets: Targets, known: Optional["Known"], ctx: TableContext) -> dict:
        """``{forecaster: forecast}``: naive forecasts of ``targets``' rows, in :meth:`proper_scores`' format.

        Args:
          train: the training split's targets (what a fitted baseline may read).
          targets: the rows to forecast (a baseline may read what their windows hold, e.g. this month).
          known: what was known at a backtest's origin (None in a split table: the baselines
            that need it are left out).
          ctx: the run's model and loss options.
        """
        return {}

    def proper_scores(self, forecast: Mapping[str, np.ndarray], targets: Targets, ctx: TableContext) -> Metrics:
        """``{score: value}`` of one forecaster's per-row forecasts against ``targets`` (None: no row to score).

        The model's forecast is its :meth:`predict` output; a baseline's comes from
        :meth:`baseline_forecasts`; every forecaster is scored by this one function. A forecast
        with a leading axis of 1 is held for every row (a backtest's forecast made at its origin).
        """
        return {}

    def calibration(self, forecast: Mapping[str, np.ndarray], targets: Targets, ctx: TableContext) -> dict:
        """``{name: array}`` for a calibration plot (reliability bins or a PIT histogram); empty: none."""
        return {}


@dataclasses.dataclass(frozen=True)
class Known:
    """What was known at a backtest's origin that a baseline forecast may read.

    Attributes:
      last_phase_index: the phase index of the last day before the origin (None: not valid).
      fatalities: float64 ``[n]``, the valid monthly fatality totals of the months before the
        origin's month, oldest first (the last is "last month").
    """

    last_phase_index: Optional[int]
    fatalities: np.ndarray


# ---------------------------------------------------------------------------
# Helpers the task modules share.
# ---------------------------------------------------------------------------


def held(forecast, n_rows: int) -> np.ndarray:
    """``forecast`` as float64 with ``n_rows`` rows: a leading axis of 1 (or a constant) is held for every row."""
    x = np.asarray(forecast, np.float64)
    if x.ndim == 0 or x.shape[0] != n_rows:
        x = np.broadcast_to(x.reshape((1,) + x.shape[1:]) if x.ndim else x, (n_rows,) + x.shape[1:])
    return x


def mean_or_none(x) -> Optional[float]:
    """The float64 mean of ``x``, or None when it is empty."""
    x = np.asarray(x, np.float64)
    return float(np.mean(x)) if x.size else None


def as_array(x, dtype) -> Optional[np.ndarray]:
    """``x`` as a numpy array of ``dtype``, or None."""
    return None if x is None else np.asarray(x, dtype)


def valid_rows(targets: Targets, flag) -> Optional[np.ndarray]:
    """bool [B]: real rows (``sample_mask``) whose validity ``flag`` is set; None if ``flag`` is None."""
    if flag is None:
        return None
    return as_array(targets.sample_mask, bool) & as_array(flag, bool)


def host_mean(x, where: np.ndarray) -> Optional[float]:
    """float64 mean of ``x`` where ``where``; None for an empty selection (unselected NaN never reaches it)."""
    n = int(np.count_nonzero(where))
    if n == 0:
        return None
    return float(np.sum(np.where(where, np.asarray(x, np.float64), 0.0)) / n)


def loss_key(task: str) -> str:
    """The metric key of a task's loss, in every phase and report."""
    return f"loss/{task}"


def targets_key(task: str) -> str:
    """The metric key of the number of rows (positions) a task's loss had targets for (0: its fallback)."""
    return f"targets/{task}"


def actual(values, valid) -> np.ndarray:
    """A table column of targets: the value where ``valid``, NaN elsewhere."""
    return np.where(np.asarray(valid, bool), np.asarray(values, np.float64), np.nan)


def finite(x) -> Optional[float]:
    """``x`` as a float when it is a finite number, else None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def skill_score(model_error, baseline_errors: Sequence) -> Optional[float]:
    """``1 - model_error / min(baseline_errors)``.

    Args:
      model_error: the model's error (lower is better).
      baseline_errors: the baselines' errors on the same rows; the best (lowest) is used.

    Returns:
      The skill (1: perfect, 0: as good as the best baseline, < 0: worse), or None when any
      input is None or non-finite, or the best baseline error is 0 (a perfect baseline leaves
      nothing to be skilful about).
    """
    model = finite(model_error)
    base = [finite(e) for e in baseline_errors]
    if model is None or not base or any(e is None for e in base):
        return None
    best = min(base)
    if best == 0.0:
        return None
    return 1.0 - model / best


def line_panel(pred: str, act: str, label: str) -> Callable:
    """A panel drawing a predicted column against its actual values (where the table has any)."""
    def draw(ax, columns, dates, marker):
        ax.plot(dates, columns[pred], color="C0", marker=marker, ms=3, label="predicted")
        if np.any(~np.isnan(columns[act])):
            ax.plot(dates, columns[act], color="k", lw=1, marker=marker, ms=3, label="actual")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")

    return draw
