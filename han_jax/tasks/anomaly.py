"""Anomaly: the VIIRS night-time radiance anomaly (a z-score) of the anchor's month, a regression.

Loss: mean squared error of the anomaly head's last-month score clipped to +-10, plus a
penalty when the predictions' variance falls below half the targets' (the original's guard
against predicting a constant); without a valid row, a tiny regulariser. Metric: that
squared error. Baseline: a zero score (no anomaly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.core.reductions import masked_moments, ratio, sum_and_count
from han_jax.tasks.base import Task, actual, as_array, host_mean, skill_score, valid_rows


def anomaly_prediction(anomaly_score):
    """The anomaly prediction: the head's last-month score, clipped to +-10 as the original's loss clips it."""
    return jnp.clip(anomaly_score[:, -1, 0], -10.0, 10.0)


class AnomalyTask(Task):
    name = "anomaly"
    outputs = ("anomaly_score",)
    prior = 1.4
    watch_collapse = True
    metric_counts = {"anomaly_mse": "n/anomaly"}
    table_rows = ("anomaly_mse", "baseline/anomaly_mse")

    def statistics(self, outputs, targets, row, config, axis_name):
        score_last = outputs["anomaly_score"][:, -1, 0]
        stats = {}
        stats["score_sq_sum"], stats["n_rows"] = sum_and_count(jnp.square(score_last), row, axis_name=axis_name)
        if targets.anomaly is None or targets.anomaly_valid is None:
            return stats
        valid = row & targets.anomaly_valid.astype(bool)
        pred = anomaly_prediction(outputs["anomaly_score"])
        target = jnp.where(valid, targets.anomaly.astype(jnp.float32), 0.0)
        stats["sq_err_sum"], stats["n_valid"] = sum_and_count(jnp.square(pred - target), valid, axis_name=axis_name)
        stats["pred"] = masked_moments(pred, valid, axis_name=axis_name)
        stats["target"] = masked_moments(target, valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        sq_mean = ratio(s["score_sq_sum"], s["n_rows"])
        if "sq_err_sum" not in s:
            return 0.01 * sq_mean, jnp.float32(0.0)
        n_valid = s["n_valid"]
        mse = ratio(s["sq_err_sum"], n_valid)
        mse = jnp.where(jnp.isnan(mse), 0.0, mse)
        var_pred, var_target = s["pred"].variance(), s["target"].variance()
        # torch.var of one element is NaN and `NaN > 1e-6` is False: no penalty.
        use_penalty = (n_valid >= 2) & (var_target > 1e-6)
        penalty = jnp.where(use_penalty, jax.nn.relu(0.5 - var_pred / (var_target + 1e-6)), 0.0)
        return jnp.where(n_valid > 0, mse + 0.1 * penalty, 1e-6 * sq_mean), n_valid

    def metrics(self, s, model):
        if "sq_err_sum" not in s:
            zero = 0.0 * s["n_rows"]
            return {"anomaly_mse": zero, "n/anomaly": zero}
        return {"anomaly_mse": ratio(s["sq_err_sum"], s["n_valid"]), "n/anomaly": s["n_valid"]}

    # -- baseline: a zero score ----------------------------------------------------------------------

    def fit_baseline(self, train, model, loss):
        return 0.0  # needs no data: "no anomaly"

    def baseline_metrics(self, zero, targets, model, loss):
        valid = valid_rows(targets, targets.anomaly_valid)
        if valid is None or targets.anomaly is None:
            return {"baseline/anomaly_mse": None}
        return {"baseline/anomaly_mse": host_mean(np.square(as_array(targets.anomaly, np.float64) - zero), valid)}

    def skill(self, metrics):
        return {"skill/anomaly": skill_score(metrics.get("anomaly_mse"), [metrics.get("baseline/anomaly_mse")])}

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, outputs, model, loss):
        return {"anomaly_logit": outputs["anomaly_score"][:, -1, 0].astype(jnp.float32)}

    def columns(self, predictions, targets, ctx):
        return {"anomaly_score": np.asarray(predictions["anomaly_logit"], np.float64),
                "actual/anomaly": actual(targets["anomaly"], targets["anomaly_valid"])}

    def describe(self, columns, i):
        return f"anomaly score {columns['anomaly_score'][i]:.3f}", []


ANOMALY = AnomalyTask()
