"""Metrics: what every phase reports, and how batches combine into epoch numbers.

One home for the metric definitions (the aggregate's decomposition, the
interpretable per-task metrics), the count each mean is weighted by, balanced
accuracy, and :class:`MetricAccumulator`, which every phase uses to combine its
batches.

Means are weighted by the count they were computed on (real rows for the
totals, valid rows for each task metric), so the last partial batch is neither
dropped nor over-weighted and padding rows never count. Counts are summed.
The original averaged batch values equally (a 2-row last batch weighed as much
as an 8-row one) and differently in each phase.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.aggregate import AggregateInfo, aggregate
from han_jax.batch import Targets
from han_jax.config import Config, LossConfig, ModelConfig
from han_jax.losses import (
    combine_statistics,
    finalize_losses,
    loss_statistics,
    masked_count,
    masked_sum,
    regime_labels,
    sanitize_outputs,
    statistics_to_host,
    zinb_parameters,
)

Array = jax.Array

# The original validate()'s stratification thresholds on the monthly observation rate.
HIGH_OBS_RATE = 0.8
LOW_OBS_RATE = 0.5
OBS_STRATA = (("high_obs", lambda rate: rate > HIGH_OBS_RATE), ("low_obs", lambda rate: rate < LOW_OBS_RATE))

# Mean-valued metrics and the count each is weighted by when batches are combined
# (any other mean is weighted by n_rows).
METRIC_WEIGHTS = {
    "weighted_total": "n_rows",
    "simple_total": "n_rows",
    "data_term": "n_rows",
    "uncertainty_term": "n_rows",
    "reg_term": "n_rows",
    "regime_accuracy": "n/regime",
    "casualty_mae": "n/casualty",
    "anomaly_mse": "n/anomaly",
    "forecast_mse": "n/forecast",
    "forecast_next_mse": "n/forecast_next",
    "high_obs/weighted_total": "high_obs/n_rows",
    "high_obs/simple_total": "high_obs/n_rows",
    "low_obs/weighted_total": "low_obs/n_rows",
    "low_obs/simple_total": "low_obs/n_rows",
}

# Keys combined by summing (counts and per-class sums), or by keeping the last value.
_SUMMED_PREFIXES = ("n/", "transition_", "regime_class_", "targets/")
_SUMMED_KEYS = ("n_rows", "high_obs/n_rows", "low_obs/n_rows", "skipped_step")
_LAST_KEYS = ("learning_rate", "loss_scale")
_MAX_KEYS = ("nan_in_outputs",)  # a flag: did any batch have it


def aggregate_metrics(losses: Mapping[str, Array], info: AggregateInfo, prefix: str = "") -> dict:
    """The totals, and without a prefix the decomposition and the per-task terms.

    Per task: ``loss/`` (raw), ``weight/`` (Kendall precision), ``contribution/``
    (its share of the weighted total) and ``included/``.
    """
    m = {f"{prefix}weighted_total": info.weighted_total, f"{prefix}simple_total": info.simple_total}
    if prefix:
        return m
    m.update(data_term=info.data_term, uncertainty_term=info.uncertainty_term, reg_term=info.reg_term)
    for task, value in losses.items():
        m[f"loss/{task}"] = value
    for task, w in info.weight.items():
        m[f"weight/{task}"] = w
    for task, c in info.contribution.items():
        m[f"contribution/{task}"] = c
    for task, inc in info.included.items():
        m[f"included/{task}"] = inc.astype(jnp.float32)
    return m


def balanced_accuracy(class_correct, class_count):
    """Mean recall over the classes present (0 when none is); jax or numpy arrays."""
    present = class_count > 0
    recall = class_correct / jnp.maximum(class_count, 1.0)
    return jnp.sum(jnp.where(present, recall, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def _counts(outputs: Mapping[str, Array], targets: Targets, row: Array, loss_config: LossConfig,
            axis_name: Optional[str]) -> dict:
    """Sums and counts behind the interpretable metrics (last month), all of which add across batches."""
    c = {}
    logits = outputs["regime_logits"][:, -1].astype(jnp.float32)
    k = logits.shape[-1]
    if targets.phase_index is not None and targets.phase_valid is not None:
        labels = regime_labels(targets.phase_index, k, loss_config.phase_to_coarse)
        valid = row & targets.phase_valid.astype(bool)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        one_hot = jax.nn.one_hot(labels, k) * valid[:, None]
        c["regime_class_correct"] = masked_sum(one_hot * correct[:, None], axis=0, axis_name=axis_name)
        c["regime_class_count"] = masked_sum(one_hot, axis=0, axis_name=axis_name)
    else:
        c["regime_class_correct"] = c["regime_class_count"] = jnp.zeros((k,), jnp.float32)

    score = outputs["anomaly_score"][:, -1, 0].astype(jnp.float32)
    if targets.is_transition is not None and targets.phase_valid is not None:
        valid = row & targets.phase_valid.astype(bool)
        y = targets.is_transition.astype(jnp.float32)
        pred = (score > 0.0).astype(jnp.float32)  # sigmoid(score) > 0.5
        c["transition_positives"] = masked_sum(y, valid, axis_name=axis_name)
        c["transition_predicted_positives"] = masked_sum(pred, valid, axis_name=axis_name)
        c["transition_true_positives"] = masked_sum(pred * y, valid, axis_name=axis_name)
        c["n/transition"] = masked_sum(jnp.ones_like(y), valid, axis_name=axis_name)
    else:
        c.update({key: jnp.float32(0.0) for key in ("transition_positives", "transition_predicted_positives",
                                                    "transition_true_positives", "n/transition")})

    if targets.fatalities is not None and targets.casualty_valid is not None:
        valid = row & targets.casualty_valid.astype(bool)
        pi, mu, _ = zinb_parameters(outputs["casualty_pred"][:, -1].astype(jnp.float32),
                                    outputs["casualty_var"][:, -1].astype(jnp.float32))
        expected = (1.0 - pi) * mu * loss_config.casualty_target_scale
        err = jnp.abs(expected - jnp.where(valid, targets.fatalities, 0.0))
        c["casualty_abs_error"], c["n/casualty"] = masked_sum(err, valid, axis_name=axis_name), masked_count(
            err, valid, axis_name=axis_name)
    else:
        c["casualty_abs_error"] = c["n/casualty"] = jnp.float32(0.0)

    if targets.anomaly is not None and targets.anomaly_valid is not None:
        valid = row & targets.anomaly_valid.astype(bool)
        err = jnp.square(jnp.clip(score, -10.0, 10.0) - jnp.where(valid, targets.anomaly, 0.0))
        c["anomaly_sq_error"], c["n/anomaly"] = masked_sum(err, valid, axis_name=axis_name), masked_count(
            err, valid, axis_name=axis_name)
    else:
        c["anomaly_sq_error"] = c["n/anomaly"] = jnp.float32(0.0)

    pred = outputs["forecast_pred"].astype(jnp.float32)
    if targets.forecast_targets is not None and targets.forecast_masks is not None:
        f = min(pred.shape[-1], targets.forecast_targets.shape[-1])
        mask = targets.forecast_masks[..., :f].astype(bool)
        target = targets.forecast_targets[..., :f].astype(jnp.float32)
        valid = mask & row[:, None, None]
        err = jnp.square(pred[..., :f] - jnp.where(valid, target, 0.0))
        c["forecast_sq_error"] = masked_sum(err, valid, axis_name=axis_name)
        c["n/forecast"] = masked_count(err, valid, axis_name=axis_name)
        # The genuine one-month-ahead forecast: the last month's prediction, on the
        # elements where persistence (this month's value, the target of month M-2)
        # also exists, so the model and han_jax.baselines score the same elements.
        if pred.shape[1] >= 2:
            nxt = valid[:, -1] & mask[:, -2]
        else:
            nxt = jnp.zeros_like(valid[:, -1])
        c["forecast_next_sq_error"] = masked_sum(err[:, -1], nxt, axis=0, axis_name=axis_name)  # [F]
        c["forecast_next_count"] = masked_sum(nxt, axis=0, axis_name=axis_name)  # [F]
    else:
        c["forecast_sq_error"] = c["n/forecast"] = jnp.float32(0.0)
        c["forecast_next_sq_error"] = c["forecast_next_count"] = jnp.zeros((pred.shape[-1],), jnp.float32)
    return c


def batch_statistics(outputs: Mapping[str, Array], targets: Targets, *, config: Config,
                     axis_name: Optional[str] = None) -> dict:
    """Everything the metrics of a set of rows need, as statistics that merge across batches.

    ``{"losses": loss_statistics (all real rows), "strata": {"high_obs", "low_obs"}:
    loss_statistics of the rows of each observation-rate stratum, "counts": sums
    and counts of the interpretable metrics}``. Statistics of disjoint batches
    merge exactly with :func:`han_jax.losses.combine_statistics`, so
    :func:`metrics_from_statistics` of a split's merged statistics gives the
    numbers of one batch holding the whole split, whatever the batch size or
    device count. With ``axis_name`` they are over all devices.
    """
    row = targets.sample_mask.astype(bool)
    loss_config = config.step.loss
    stats = {"losses": loss_statistics(outputs, targets, loss_config, axis_name=axis_name), "strata": {}}
    counts = _counts(outputs, targets, row, loss_config, axis_name)
    counts["n_rows"] = masked_sum(row.astype(jnp.float32), None, axis_name=axis_name)
    _, has_nan = sanitize_outputs(outputs, row, axis_name)
    counts["nan_in_outputs"] = has_nan.astype(jnp.float32)
    # validate()'s observation-rate split, per row: the same statistics on the rows
    # of each stratum (the original filed whole-batch totals by row).
    obs = targets.monthly_obs_rate
    for name, keep in OBS_STRATA:
        sub_row = row & (keep(obs) if obs is not None else jnp.zeros_like(row))
        stats["strata"][name] = loss_statistics(outputs, targets.replace(sample_mask=sub_row), loss_config,
                                                axis_name=axis_name)
        counts[f"{name}/n_rows"] = masked_sum(sub_row.astype(jnp.float32), None, axis_name=axis_name)
    stats["counts"] = counts
    return stats


def forecast_sources(model: ModelConfig) -> tuple:
    """The sources the forecast head predicts, as (name, n_features) column blocks from column 0.

    The forecast targets hold the monthly sources first, then monthly means of the
    daily ones; the head predicts the monthly block (``n_monthly_features``), so the
    forecast metrics cover those columns.
    """
    return tuple(model.monthly_sources)


def metrics_from_statistics(stats: dict, log_vars: Mapping[str, Array], *, config: Config) -> dict:
    """Every shared metric from (merged) :func:`batch_statistics`: one definition for every phase.

    Task losses (floors and fallbacks included) come from
    :func:`han_jax.losses.finalize_losses`, then the Kendall total, the simple
    total and the decomposition from :func:`han_jax.aggregate.aggregate`.
    ``targets/<task>`` is the number of rows (positions, for the forecast) the
    task's loss was computed on: 0 means the task had no targets and its loss is
    the original's tiny fallback regulariser. Mean-valued metrics with no valid
    row are 0 here; the host accumulators turn them into None.

    Works inside ``jit`` (a batch's own numbers) and on host statistics.
    """
    losses, n_valid = finalize_losses(stats["losses"], config.step.loss)
    _, info = aggregate(losses, log_vars, config.step.aggregate)
    m = aggregate_metrics(losses, info)
    m.update({f"targets/{task}": n for task, n in n_valid.items()})
    for name, sub in stats["strata"].items():
        sub_losses, _ = finalize_losses(sub, config.step.loss)
        _, sub_info = aggregate(sub_losses, log_vars, config.step.aggregate)
        m.update(aggregate_metrics(sub_losses, sub_info, prefix=f"{name}/"))

    c = {k: jnp.asarray(v, jnp.float32) for k, v in stats["counts"].items()}
    for key in ("n_rows", "nan_in_outputs", "high_obs/n_rows", "low_obs/n_rows", "transition_positives",
                "transition_predicted_positives", "transition_true_positives", "n/transition",
                "regime_class_correct", "regime_class_count", "n/casualty", "n/anomaly", "n/forecast"):
        m[key] = c[key]
    m["n/regime"] = jnp.sum(c["regime_class_count"])
    m["regime_accuracy"] = _ratio(jnp.sum(c["regime_class_correct"]), m["n/regime"])
    m["regime_balanced_accuracy"] = balanced_accuracy(c["regime_class_correct"], c["regime_class_count"])
    m["casualty_mae"] = _ratio(c["casualty_abs_error"], c["n/casualty"])
    m["anomaly_mse"] = _ratio(c["anomaly_sq_error"], c["n/anomaly"])
    m["forecast_mse"] = _ratio(c["forecast_sq_error"], c["n/forecast"])
    err, count = c["forecast_next_sq_error"], c["forecast_next_count"]
    m["forecast_next_mse"], m["n/forecast_next"] = _ratio(jnp.sum(err), jnp.sum(count)), jnp.sum(count)
    start = 0
    for name, width in forecast_sources(config.model):
        cols = slice(start, min(start + width, err.shape[0]))
        start += width
        m[f"forecast_next_mse/{name}"] = _ratio(jnp.sum(err[cols]), jnp.sum(count[cols]))
        m[f"n/forecast_next/{name}"] = jnp.sum(count[cols])
    return m


def _ratio(total, count):
    return total / jnp.maximum(count, 1.0)


def count_key(key: str) -> str:
    """The count a mean-valued metric is weighted by (and is null without)."""
    if key.startswith("forecast_next_mse/"):
        return "n/forecast_next/" + key.split("/", 1)[1]
    return METRIC_WEIGHTS.get(key, "n_rows")


class MetricAccumulator:
    """Accumulates step metrics (host numpy) into epoch metrics."""

    def __init__(self):
        self._sums: dict = {}
        self._weights: dict = {}
        self._last: dict = {}

    def update(self, metrics: Mapping, *, device_axis: bool = False) -> None:
        """Adds one step's metrics; with ``device_axis`` they carry a pmap axis (equal values)."""
        host = jax.device_get(metrics)
        if device_axis:
            host = {k: np.asarray(v)[0] for k, v in host.items()}
        for key, value in host.items():
            value = np.asarray(value, np.float64)
            if key in _LAST_KEYS:
                self._last[key] = value
            elif key in _MAX_KEYS:
                self._last[key] = np.maximum(self._last.get(key, 0.0), value)
            elif key in _SUMMED_KEYS or key.startswith(_SUMMED_PREFIXES):
                self._sums[key] = self._sums.get(key, 0.0) + value
            else:
                w = float(np.asarray(host[count_key(key)]))
                self._sums[key] = self._sums.get(key, 0.0) + value * w
                self._weights[key] = self._weights.get(key, 0.0) + w

    def result(self) -> dict:
        out = {}
        for key, total in self._sums.items():
            if key in self._weights:
                w = self._weights[key]
                # No valid row all epoch: the metric does not exist (null in JSON), it is not 0.
                out[key] = float(total / w) if w > 0 else None
            else:
                out[key] = total.tolist() if np.ndim(total) else float(total)
        out.update({k: float(v) for k, v in self._last.items()})
        if "regime_class_count" in out:
            out["regime_balanced_accuracy"] = float(balanced_accuracy(
                np.asarray(out["regime_class_correct"]), np.asarray(out["regime_class_count"])))
        return out


@functools.lru_cache(maxsize=16)
def _finalize_fn(config: Config):
    return jax.jit(functools.partial(metrics_from_statistics, config=config))


def to_host_metrics(metrics: Mapping) -> dict:
    """Python numbers (lists for per-class vectors); a mean-valued metric with no valid row is None."""
    host = jax.device_get(dict(metrics))
    out = {}
    for key, value in host.items():
        value = np.asarray(value, np.float64)
        out[key] = value.tolist() if value.ndim else float(value)
    for key in out:
        if key in _LAST_KEYS + _MAX_KEYS + _SUMMED_KEYS or key.startswith(_SUMMED_PREFIXES):
            continue
        count = out.get(count_key(key))
        if count is not None and not np.ndim(count) and count == 0:
            out[key] = None
    return out


class SplitAccumulator:
    """Exact split metrics: merges batches' :func:`batch_statistics`, finalises once.

    Its :meth:`result` is the metrics of one batch holding every row it was
    given, for any batch size and device count (up to float rounding: the
    running sums are float64, the finalisation f32). Evaluation of a split
    (val, test, and the final scoring of every split) uses it. The train phase
    of an epoch reports :class:`MetricAccumulator`'s row-weighted mean of
    per-batch numbers instead: the per-batch objective is what training
    optimises, as in the original.
    """

    def __init__(self):
        self._stats = None

    def update(self, statistics: Mapping, *, device_axis: bool = False) -> None:
        """Adds one batch's statistics; with ``device_axis`` they carry a pmap axis (equal, psum-ed copies)."""
        if device_axis:
            statistics = jax.tree_util.tree_map(lambda x: x[0], statistics)
        host = statistics_to_host(statistics)
        self._stats = host if self._stats is None else combine_statistics(self._stats, host)

    def result(self, log_vars: Mapping, config: Config) -> dict:
        if self._stats is None:
            raise ValueError("SplitAccumulator.result: no batch was added")
        stats = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), self._stats)
        metrics = to_host_metrics(_finalize_fn(config)(stats, jax.device_get(log_vars)))
        # A flag per batch in a step; over a split, whether any batch had one.
        metrics["nan_in_outputs"] = float(self._stats["counts"]["nan_in_outputs"] > 0)
        return metrics
