"""Naive baselines fitted on the training split, and the model's skill against them.

A metric on its own does not say whether the model learnt anything: a 0.3
forecast MSE may be worse than repeating this month's value. This module fits
the naive forecasters below on the *training* targets only, scores them on any
split with the same row selection as the model's metrics, and turns the pair
into a skill score ``1 - model error / best baseline error`` (1: perfect,
0: no better than the best naive forecaster, < 0: worse).

=================  ===========================================================
task               baseline
=================  ===========================================================
regime             always the most frequent coarse regime class of train
transition         the constant probability "fraction of train rows that are
                   transitions"
casualty           the mean train fatality count
anomaly            a zero anomaly score
forecast (next     persistence ("next month = this month") and the train
month)             per-feature climatology
=================  ===========================================================

Everything is host-side numpy in float64; targets may be numpy or jax arrays
(one batch holding a whole split, see :func:`split_targets`). Rows count only
where ``sample_mask`` is True and the task's validity flag is set. A metric
with no valid row is ``None``, never NaN or 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from han_jax.batch import Targets

# The constant transition probability is clipped before its logarithms are taken,
# so a train split without (or with only) transitions gives a large finite
# cross-entropy instead of inf.
BCE_EPS = 1e-7

SourceLayout = Sequence[Tuple[str, int]]
Metrics = dict  # str -> float | None

TASKS = ("regime", "transition", "casualty", "anomaly", "forecast")


@dataclasses.dataclass(frozen=True, eq=False)
class Baselines:
    """The naive forecasters, fitted on the training split only.

    Attributes:
      regime_majority: most frequent coarse regime class among the valid train
        rows (ties go to the lowest class); None if there is no valid row.
      transition_rate: fraction of the valid train rows (``phase_valid``) that
        are transitions; None if there is no valid row.
      casualty_mean: mean ``fatalities`` over the valid train rows, in the data's
        units (raw counts, as ``Targets.fatalities`` holds them); None if none.
      forecast_climatology: float64 ``[Ft]``, per-feature mean of the train
        ``forecast_targets`` at the last month position over its valid elements;
        NaN for a feature with no valid element; None if the targets carry no
        forecast targets. Read-only.
    """

    regime_majority: Optional[int]
    transition_rate: Optional[float]
    casualty_mean: Optional[float]
    forecast_climatology: Optional[np.ndarray]

    def __eq__(self, other) -> bool:
        """Field-wise equality; climatologies compare element-wise with NaN equal to NaN."""
        if not isinstance(other, Baselines):
            return NotImplemented
        a, b = self.forecast_climatology, other.forecast_climatology
        same_clim = (a is None and b is None) or (
            a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b, equal_nan=True))
        return (self.regime_majority, self.transition_rate, self.casualty_mean) == (
            other.regime_majority, other.transition_rate, other.casualty_mean) and same_clim

    __hash__ = None  # holds an array


# ---------------------------------------------------------------------------
# Row selection
# ---------------------------------------------------------------------------


def split_targets(split) -> Targets:
    """The targets of a whole split as one numpy batch without padding rows.

    Args:
      split: a ``han_jax.data.SplitData``.

    Returns:
      ``Targets`` with one row per anchor of the split (``sample_mask`` all True).
    """
    from han_jax.data import iterate_batches  # the data pipeline is only needed here

    _, targets = next(iterate_batches(split, len(split)))
    return targets


def _as(x, dtype) -> Optional[np.ndarray]:
    """``x`` as a numpy array of ``dtype``, or None."""
    return None if x is None else np.asarray(x, dtype)


def _valid_rows(targets: Targets, flag) -> Optional[np.ndarray]:
    """bool [B]: real rows (``sample_mask``) whose validity ``flag`` is set; None if ``flag`` is None."""
    if flag is None:
        return None
    return _as(targets.sample_mask, bool) & _as(flag, bool)


def regime_labels_np(phase_index, n_classes: int, phase_to_coarse: Sequence[int]) -> np.ndarray:
    """numpy twin of :func:`han_jax.losses.regime_labels`.

    Args:
      phase_index: int [B], the 11-phase regime index.
      n_classes: the regime head's class count.
      phase_to_coarse: the phase -> coarse class map (``LossConfig.phase_to_coarse``).

    Returns:
      int64 [B] class labels: the phase itself for an ``n_classes == len(phase_to_coarse)``
      head, otherwise the coarse class; clipped into ``[0, n_classes)`` like the loss.
    """
    phase = np.clip(np.asarray(phase_index, np.int64), 0, len(phase_to_coarse) - 1)
    if n_classes != len(phase_to_coarse):
        phase = np.asarray(phase_to_coarse, np.int64)[phase]
    return np.clip(phase, 0, n_classes - 1)


def _regime_rows(targets: Targets, n_classes: int, phase_to_coarse) -> Optional[np.ndarray]:
    """int64 labels of the valid regime rows, or None if the targets carry no phases."""
    valid = _valid_rows(targets, targets.phase_valid)
    if valid is None or targets.phase_index is None:
        return None
    return regime_labels_np(targets.phase_index, n_classes, phase_to_coarse)[valid]


def _masked_mean(x: np.ndarray, where: np.ndarray) -> Optional[float]:
    """float64 mean of ``x`` where ``where``; None for an empty selection.

    Unselected entries are replaced by 0 before summing, so a NaN there (a padded
    value, a NaN climatology) never reaches the result.
    """
    n = int(np.count_nonzero(where))
    if n == 0:
        return None
    return float(np.sum(np.where(where, np.asarray(x, np.float64), 0.0)) / n)


# ---------------------------------------------------------------------------
# Fitting (train only)
# ---------------------------------------------------------------------------


def majority_class(labels: np.ndarray, n_classes: int) -> Optional[int]:
    """The most frequent label; ties go to the lowest class.

    Args:
      labels: int [N] class labels in ``[0, n_classes)``.
      n_classes: number of classes.

    Returns:
      The class, or None for no label.
    """
    if labels.size == 0:
        return None
    # argmax returns the first maximum, i.e. the lowest class of a tie.
    return int(np.argmax(np.bincount(labels, minlength=n_classes)))


def forecast_climatology(targets: Targets) -> Optional[np.ndarray]:
    """Per-feature mean of ``forecast_targets`` at the last month position.

    Args:
      targets: the (training) targets, ``forecast_targets`` [B, M, Ft].

    Returns:
      float64 [Ft], the mean over real rows with ``forecast_masks[:, M-1, f]``;
      NaN for a feature without a valid element; None if the targets carry no
      forecast targets or no month.
    """
    if targets.forecast_targets is None or targets.forecast_masks is None:
        return None
    y = _as(targets.forecast_targets, np.float64)
    if y.shape[1] < 1:
        return None
    where = _as(targets.forecast_masks, bool)[:, -1] & _as(targets.sample_mask, bool)[:, None]
    count = where.sum(axis=0)
    total = np.where(where, y[:, -1], 0.0).sum(axis=0)
    # NaN, not 0, marks "no data": 0 would be a (normalised-mean) prediction.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def fit_baselines(train_targets: Targets, *, n_regime_classes: int, phase_to_coarse: Sequence[int]) -> Baselines:
    """Fits every baseline on the training targets (and nothing else).

    Args:
      train_targets: the whole training split as one batch (:func:`split_targets`).
      n_regime_classes: the regime head's class count (``ModelConfig.n_regime_classes``).
      phase_to_coarse: ``LossConfig.phase_to_coarse``.

    Returns:
      The fitted :class:`Baselines`; a baseline whose task has no valid train row is None.
    """
    t = train_targets
    labels = _regime_rows(t, n_regime_classes, phase_to_coarse)
    majority = None if labels is None else majority_class(labels, n_regime_classes)

    rate = None
    valid = _valid_rows(t, t.phase_valid)
    if valid is not None and t.is_transition is not None:
        rate = _masked_mean(_as(t.is_transition, np.float64), valid)

    mean_fatalities = None
    valid = _valid_rows(t, t.casualty_valid)
    if valid is not None and t.fatalities is not None:
        mean_fatalities = _masked_mean(_as(t.fatalities, np.float64), valid)

    clim = forecast_climatology(t)
    if clim is not None:
        clim.setflags(write=False)
    return Baselines(majority, rate, mean_fatalities, clim)


# ---------------------------------------------------------------------------
# Scoring (any split)
# ---------------------------------------------------------------------------


def forecast_next_elements(targets: Targets, climatology: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The element set E every next-month forecast metric is computed on.

    The genuine next-month forecast is the last month position ``m = M-1``
    (earlier positions forecast months the window already holds). An element
    ``(row, f)`` belongs to E when the row is real (``sample_mask``), the target
    ``forecast_targets[row, M-1, f]`` is valid, the persistence input
    ``forecast_targets[row, M-2, f]`` is valid, and the feature has a finite
    train climatology. The last condition drops a feature without train data
    from *every* forecaster, so all of them are scored on identical elements.

    Contract: the model's ``forecast_next_mse`` (and ``forecast_next_mse/<source>``)
    must be the mean of ``(forecast_pred[:, M-1, f] - forecast_targets[:, M-1, f])**2``
    over exactly these elements (restricted to the columns the model forecasts,
    ``mask[:, :F]``, and to a source's columns for the per-source values), with
    the climatology of the same :class:`Baselines` the skill compares against.
    Otherwise the skill scores compare errors on different data.

    Note: with ``DataConfig.prediction_horizon = h > 1`` position M-2 holds month
    ``anchor + h - 1``, which lies after the anchor; persistence is then an
    optimistic (leaking) baseline. It is the genuine "this month" for h = 1.

    Args:
      targets: the targets to score, ``forecast_targets`` / ``forecast_masks`` [B, M, Ft].
      climatology: float [Ft] train climatology (:attr:`Baselines.forecast_climatology`);
        None means no feature has one (E is empty).

    Returns:
      bool [B, Ft]; all False when M < 2; None if the targets carry no forecast targets.

    Raises:
      ValueError: if ``climatology`` does not have Ft entries.
    """
    if targets.forecast_targets is None or targets.forecast_masks is None:
        return None
    masks = _as(targets.forecast_masks, bool)
    B, M, Ft = masks.shape
    if climatology is not None and np.shape(climatology) != (Ft,):
        raise ValueError(f"climatology has shape {np.shape(climatology)}; expected ({Ft},) like forecast_targets")
    if M < 2 or climatology is None:
        return np.zeros((B, Ft), bool)
    has_clim = np.isfinite(np.asarray(climatology, np.float64))
    return _as(targets.sample_mask, bool)[:, None] & masks[:, M - 1] & masks[:, M - 2] & has_clim[None, :]


def _source_columns(sources: SourceLayout, n_total: int) -> list:
    """``[(name, slice)]`` of consecutive column blocks; raises if they need more than ``n_total`` columns."""
    out, start = [], 0
    for name, n in sources:
        out.append((name, slice(start, start + int(n))))
        start += int(n)
    if start > n_total:
        raise ValueError(f"forecast_sources need {start} columns; the forecast targets have {n_total}")
    return out


def _regime_metrics(majority: Optional[int], labels: Optional[np.ndarray]) -> Tuple[Optional[float], ...]:
    """Accuracy and balanced accuracy of always predicting ``majority``."""
    if majority is None or labels is None or labels.size == 0:
        return None, None
    accuracy = float(np.mean(labels == majority))
    present = np.unique(labels)
    # A constant predictor recalls all of its own class and none of any other,
    # so the mean recall over the present classes is 1/#present or 0.
    balanced = float(majority in present) / len(present)
    return accuracy, balanced


def _transition_bce(rate: Optional[float], targets: Targets) -> Optional[float]:
    """Mean binary cross-entropy of the constant probability ``rate``."""
    valid = _valid_rows(targets, targets.phase_valid)
    if rate is None or valid is None or targets.is_transition is None:
        return None
    p = float(np.clip(rate, BCE_EPS, 1.0 - BCE_EPS))
    y = _as(targets.is_transition, np.float64)
    # log1p(-p) keeps precision for p close to 0.
    per_row = -(y * math.log(p) + (1.0 - y) * math.log1p(-p))
    return _masked_mean(per_row, valid)


def _casualty_mae(mean: Optional[float], targets: Targets) -> Optional[float]:
    valid = _valid_rows(targets, targets.casualty_valid)
    if mean is None or valid is None or targets.fatalities is None:
        return None
    return _masked_mean(np.abs(mean - _as(targets.fatalities, np.float64)), valid)


def _anomaly_mse(targets: Targets) -> Optional[float]:
    valid = _valid_rows(targets, targets.anomaly_valid)
    if valid is None or targets.anomaly is None:
        return None
    return _masked_mean(np.square(_as(targets.anomaly, np.float64)), valid)


def _forecast_metrics(b: Baselines, targets: Targets, forecast_sources: SourceLayout) -> Metrics:
    """Persistence and climatology MSE on E, overall (the sources' columns) and per source, with counts."""
    m: Metrics = {}
    elements = forecast_next_elements(targets, b.forecast_climatology)
    if elements is None:  # no forecast targets at all
        for suffix in [""] + [f"/{name}" for name, _ in forecast_sources]:
            m[f"baseline/forecast_persistence_mse{suffix}"] = None
            m[f"baseline/forecast_climatology_mse{suffix}"] = None
            m[f"n/forecast_next{suffix}"] = 0.0
        return m
    columns = _source_columns(forecast_sources, elements.shape[1])
    covered = slice(0, columns[-1][1].stop if columns else 0)
    blocks = [("", covered)] + [(f"/{name}", cols) for name, cols in columns]
    y = _as(targets.forecast_targets, np.float64)
    M = y.shape[1]
    if M >= 2:
        truth, current = y[:, M - 1], y[:, M - 2]
    else:  # E is empty; any arrays of the right shape do
        truth = current = np.zeros(elements.shape)
    clim = np.zeros(elements.shape[1]) if b.forecast_climatology is None else b.forecast_climatology
    persistence_err = np.square(current - truth)
    climatology_err = np.square(clim[None, :] - truth)
    for suffix, cols in blocks:
        where = elements[:, cols]
        m[f"baseline/forecast_persistence_mse{suffix}"] = _masked_mean(persistence_err[:, cols], where)
        m[f"baseline/forecast_climatology_mse{suffix}"] = _masked_mean(climatology_err[:, cols], where)
        m[f"n/forecast_next{suffix}"] = float(np.count_nonzero(where))
    return m


def baseline_metrics(
    b: Baselines,
    targets: Targets,
    *,
    n_regime_classes: int,
    phase_to_coarse: Sequence[int],
    forecast_sources: SourceLayout,
) -> Metrics:
    """Scores the fitted baselines on one split.

    Args:
      b: baselines from :func:`fit_baselines` (fitted on train).
      targets: the split to score, as one batch (:func:`split_targets`).
      n_regime_classes: the regime head's class count.
      phase_to_coarse: ``LossConfig.phase_to_coarse``.
      forecast_sources: ``(name, n_features)`` of the forecast target columns,
        in column order (``model.monthly_sources`` then ``model.daily_sources``
        for every column; ``model.monthly_sources`` alone for the columns the
        model's forecast head predicts). The blocks start at column 0; the
        overall forecast metrics cover exactly their columns.

    Returns:
      ``{key: float or None}`` (None: no valid row / element), keys
      ``baseline/regime_accuracy``, ``baseline/regime_balanced_accuracy`` (mean
      recall over the classes present in the split), ``baseline/transition_bce``,
      ``baseline/casualty_mae``, ``baseline/anomaly_mse``,
      ``baseline/forecast_persistence_mse``, ``baseline/forecast_climatology_mse``,
      ``n/forecast_next`` (size of E, see :func:`forecast_next_elements`), and
      per source ``baseline/forecast_persistence_mse/<source>``,
      ``baseline/forecast_climatology_mse/<source>``, ``n/forecast_next/<source>``.
      The forecast metrics are on the last month position over E, which leaves out
      features with a NaN climatology for every forecaster; with M < 2 they are None.

    Raises:
      ValueError: if ``forecast_sources`` need more columns than the targets have.
    """
    accuracy, balanced = _regime_metrics(b.regime_majority, _regime_rows(targets, n_regime_classes, phase_to_coarse))
    m: Metrics = {
        "baseline/regime_accuracy": accuracy,
        "baseline/regime_balanced_accuracy": balanced,
        "baseline/transition_bce": _transition_bce(b.transition_rate, targets),
        "baseline/casualty_mae": _casualty_mae(b.casualty_mean, targets),
        "baseline/anomaly_mse": _anomaly_mse(targets),
    }
    m.update(_forecast_metrics(b, targets, forecast_sources))
    return m


# ---------------------------------------------------------------------------
# Skill
# ---------------------------------------------------------------------------


def _finite(x) -> Optional[float]:
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
      The skill (1: perfect, 0: as good as the best baseline, < 0: worse), or None
      when any input is None or non-finite, or the best baseline error is 0
      (a perfect baseline leaves nothing to be skilful about).
    """
    model = _finite(model_error)
    base = [_finite(e) for e in baseline_errors]
    if model is None or not base or any(e is None for e in base):
        return None
    best = min(base)
    if best == 0.0:
        return None
    return 1.0 - model / best


def _one_minus(x) -> Optional[float]:
    v = _finite(x)
    return None if v is None else 1.0 - v


def _sources_in(metrics: Mapping, prefixes: Sequence[str]) -> list:
    """Source names of every key ``<prefix>/<source>``, in first-seen order."""
    names: dict = {}
    for key in metrics:
        for prefix in prefixes:
            if key.startswith(prefix + "/"):
                names.setdefault(key[len(prefix) + 1:], None)
    return list(names)


def skill(metrics: Mapping) -> Metrics:
    """The model's skill against the best baseline, per task.

    Args:
      metrics: one mapping holding the model's metrics (``regime_balanced_accuracy``,
        ``loss/transition``, ``n/transition``, ``casualty_mae``, ``anomaly_mse``,
        ``forecast_next_mse`` and ``forecast_next_mse/<source>``) and the output of
        :func:`baseline_metrics` on the same split.

    Returns:
      ``skill/<task>`` = 1 - model error / best baseline error for ``regime``
      (error = 1 - balanced accuracy), ``transition`` (mean BCE; only when
      ``n/transition`` > 0, and comparable only without the focal loss),
      ``casualty`` (MAE), ``anomaly`` (MSE) and ``forecast`` (next-month MSE
      against the better of persistence and climatology), plus
      ``skill/forecast/<source>`` for every source named in either the model's or
      the baselines' per-source keys. None when an input is None, missing or
      non-finite, or the best baseline error is 0.
    """
    g = metrics.get
    out: Metrics = {
        "skill/regime": skill_score(_one_minus(g("regime_balanced_accuracy")),
                                    [_one_minus(g("baseline/regime_balanced_accuracy"))]),
        "skill/transition": None,
        "skill/casualty": skill_score(g("casualty_mae"), [g("baseline/casualty_mae")]),
        "skill/anomaly": skill_score(g("anomaly_mse"), [g("baseline/anomaly_mse")]),
    }
    n_transition = _finite(g("n/transition"))
    if n_transition is not None and n_transition > 0:
        out["skill/transition"] = skill_score(g("loss/transition"), [g("baseline/transition_bce")])
    persistence, climatology = "baseline/forecast_persistence_mse", "baseline/forecast_climatology_mse"
    out["skill/forecast"] = skill_score(g("forecast_next_mse"), [g(persistence), g(climatology)])
    for name in _sources_in(metrics, ("forecast_next_mse", persistence, climatology)):
        out[f"skill/forecast/{name}"] = skill_score(
            g(f"forecast_next_mse/{name}"), [g(f"{persistence}/{name}"), g(f"{climatology}/{name}")])
    return out
