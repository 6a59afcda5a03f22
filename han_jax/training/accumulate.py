"""From steps to a phase's numbers: batches' statistics merged on the host, finalised once.

Every step returns its batch's statistics (sums with their counts, as Flax's ``wmt``
returns metric sums with a denominator). :class:`SplitAccumulator` merges them in float64
and finalises once (:func:`~han_jax.objective.metrics_from_statistics`): the numbers of one
batch holding every row it was given, whatever the batch size or device count (up to float
rounding). Validation, test, and the final scoring of every split use it.

The train phase of an epoch (:class:`EpochAccumulator`) reports the same exact metrics
from the train steps' statistics (dropout on), except for the losses and totals, which are
the row-weighted mean of the per-batch values: the per-batch objective is what training
optimises, as in the original (which averaged batches equally, a 2-row last batch weighing
as much as a full one). Padding rows never count.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.core.reductions import merge_statistics
from han_jax.objective import Objective, count_key, metrics_from_statistics, statistics_to_host, to_host_metrics

# Train-only values: the last step's, or summed over the epoch.
_LAST = ("learning_rate", "loss_scale")
_SUMMED = ("skipped_step",)
# Train-only per-batch values, each a mean over the batch's rows.
_PER_ROW = ("objective", "temporal_reg", "grad_norm")


@functools.lru_cache(maxsize=16)
def _finalize_fn(objective: Objective):
    return jax.jit(functools.partial(metrics_from_statistics, objective=objective))


class SplitAccumulator:
    """Exact split metrics: merges batches' statistics, finalises once (see the module docstring)."""

    def __init__(self):
        self._stats = None

    def update(self, statistics: Mapping, *, device_axis: bool = False) -> None:
        """Adds one batch's statistics; with ``device_axis`` they carry a pmap axis (equal, psum-ed copies)."""
        if device_axis:
            statistics = jax.tree_util.tree_map(lambda x: x[0], statistics)
        host = statistics_to_host(statistics)
        self._stats = host if self._stats is None else merge_statistics(self._stats, host)

    def result(self, log_vars: Mapping, objective: Objective) -> dict:
        """The metrics of every row added (host numbers; a mean with no valid row is None)."""
        if self._stats is None:
            raise ValueError("SplitAccumulator.result: no batch was added")
        stats = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), self._stats)
        metrics = to_host_metrics(_finalize_fn(objective)(stats, jax.device_get(log_vars)), objective.tasks)
        # A flag per batch in a step; over a split, whether any batch had one.
        metrics["nan_in_outputs"] = float(self._stats["nan_in_outputs"] > 0)
        return metrics


class EpochAccumulator:
    """The train phase of an epoch: exact metrics of the steps' statistics, per-batch means for the losses."""

    def __init__(self):
        self._split = SplitAccumulator()
        self._sums: dict = {}
        self._weights: dict = {}
        self._values: dict = {}

    def update(self, metrics: Mapping, statistics: Mapping, *, device_axis: bool = False) -> None:
        """Adds one train step's metrics and statistics (with ``device_axis``: pmap copies, equal)."""
        self._split.update(statistics, device_axis=device_axis)
        host = jax.device_get(dict(metrics))
        if device_axis:
            host = {k: np.asarray(v)[0] for k, v in host.items()}
        for key, value in host.items():
            if key in _LAST:
                self._values[key] = float(value)
            elif key in _SUMMED:
                self._values[key] = self._values.get(key, 0.0) + float(value)
            else:
                count = count_key(key, ()) or ("n_rows" if key in _PER_ROW else None)
                if count is None:
                    continue  # a count, a per-class vector or a task metric: exact from the statistics
                weight = float(host[count])
                self._sums[key] = self._sums.get(key, 0.0) + float(value) * weight
                self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self, log_vars: Mapping, objective: Objective) -> dict:
        out = self._split.result(log_vars, objective)
        for key, total in self._sums.items():
            weight = self._weights[key]
            # No row all epoch (a stratum, say): the metric does not exist (null in JSON), it is not 0.
            out[key] = float(total / weight) if weight > 0 else None
        out.update(self._values)
        return out
