"""Epoch metrics: every phase combines its batches the same way.

Means are weighted by the count they were computed on (real rows for the
totals, valid rows for each task metric), so the last partial batch is neither
dropped nor over-weighted and padding rows never count. Counts are summed.
The original averaged batch values equally (a 2-row last batch weighed as much
as an 8-row one) and differently in each phase.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from han_jax.steps import METRIC_WEIGHTS

_SUMMED_PREFIXES = ("n/", "transition_", "regime_class_")
_SUMMED_KEYS = ("n_rows", "high_obs/n_rows", "low_obs/n_rows", "nan_in_outputs", "skipped_step")
_LAST_KEYS = ("learning_rate", "loss_scale")


def _weight_key(key: str) -> str:
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
            elif key in _SUMMED_KEYS or key.startswith(_SUMMED_PREFIXES):
                self._sums[key] = self._sums.get(key, 0.0) + value
            else:
                w = float(np.asarray(host[_weight_key(key)]))
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
            count = np.asarray(out["regime_class_count"])
            correct = np.asarray(out["regime_class_correct"])
            present = count > 0
            out["regime_balanced_accuracy"] = float((correct[present] / count[present]).mean()) if present.any() else 0.0
        return out
