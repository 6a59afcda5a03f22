"""Transition: does the anchor day start a new phase? A binary classification.

The original has no transition head: it reads the transition logit from the anomaly head's
last-month score (``anomaly_score[:, -1, 0]``, ``docs/model.md``), so this task and
:mod:`han_jax.tasks.anomaly` share one output; ``ModelConfig.transition_head`` (a han-jax
option, off by default) gives it a head of its own (``transition_logit``). Loss: binary cross-entropy of that logit
clipped to +-50 (or, optionally, the focal loss of the original's later versions); without
a valid row, a tiny regulariser. Baseline: the training split's transition rate.

Proper scores of the probability (:mod:`han_jax.core.scores`): the log score, the Brier
score and the average precision, for the model and for the training base rate alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from han_jax.core import scores
from han_jax.core.reductions import masked_sum, ratio, sum_and_count
from han_jax.tasks.base import (
    Task,
    actual,
    as_array,
    finite,
    held,
    host_mean,
    loss_key,
    mean_or_none,
    skill_score,
    valid_rows,
)

# The constant baseline probability is clipped before its logarithms are taken, so a train split
# without (or with only) transitions gives a large finite cross-entropy instead of inf.
BCE_EPS = 1e-7


def transition_score(outputs):
    """The last-month transition score: the transition head's where the model has one, else the anomaly head's."""
    return outputs.get("transition_logit", outputs["anomaly_score"])[:, -1, 0]


def transition_logit(outputs):
    """The transition logit: the last-month score, clipped to +-50 as the original's loss clips it."""
    return jnp.clip(transition_score(outputs), -50.0, 50.0)


def sigmoid_focal_loss(logits, labels, alpha: float, gamma: float):
    """Per-row binary focal loss as the original's ``FocalLoss`` (ML-OSINT HEAD).

    ``alpha_t (1 - p_t)^gamma BCE`` with ``p_t = exp(-BCE)``.

    References:
      Lin et al. 2017, "Focal Loss for Dense Object Detection".
    """
    bce = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
    p_t = jnp.exp(-bce)
    alpha_t = alpha * labels + (1.0 - alpha) * (1.0 - labels)
    return alpha_t * jnp.power(1.0 - p_t, gamma) * bce


class TransitionTask(Task):
    name = "transition"
    headline_score = "log_score"
    outputs = ("anomaly_score",)
    optional_outputs = ("transition_logit",)  # ModelConfig.transition_head
    prior = 1.4
    table_rows = ("baseline/transition_bce",)

    def statistics(self, outputs, targets, row, config, axis_name):
        score_last = transition_score(outputs)
        stats = {}
        stats["score_sq_sum"], stats["n_rows"] = sum_and_count(jnp.square(score_last), row, axis_name=axis_name)
        if targets.is_transition is None or targets.phase_valid is None:
            return stats
        valid = row & targets.phase_valid.astype(bool)
        logits = transition_logit(outputs)
        labels = targets.is_transition.astype(jnp.float32)
        if config.transition_focal:
            per_row = sigmoid_focal_loss(logits, labels, config.focal_alpha, config.focal_gamma)
        else:
            per_row = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
        stats["loss_sum"], stats["n_valid"] = sum_and_count(per_row, valid, axis_name=axis_name)
        predicted = (score_last > 0.0).astype(jnp.float32)  # sigmoid(score) > 0.5
        stats["positives"] = masked_sum(labels, valid, axis_name=axis_name)
        stats["predicted_positives"] = masked_sum(predicted, valid, axis_name=axis_name)
        stats["true_positives"] = masked_sum(predicted * labels, valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        fallback = 1e-6 * ratio(s["score_sq_sum"], s["n_rows"])
        if "loss_sum" not in s:
            return fallback, jnp.float32(0.0)
        n_valid = s["n_valid"]
        loss = ratio(s["loss_sum"], n_valid)
        loss = jnp.where(jnp.isnan(loss), 0.0, loss)
        return jnp.where(n_valid > 0, loss, fallback), n_valid

    def metrics(self, s, model):
        keys = ("positives", "predicted_positives", "true_positives")
        if "loss_sum" not in s:
            zero = 0.0 * s["n_rows"]
            return {**{f"transition_{k}": zero for k in keys}, "n/transition": zero}
        return {**{f"transition_{k}": s[k] for k in keys}, "n/transition": s["n_valid"]}

    # -- baseline: the training split's transition rate ----------------------------------------------

    def fit_baseline(self, train, model, loss):
        """The fraction of valid train rows that are transitions; None without a valid row."""
        valid = valid_rows(train, train.phase_valid)
        if valid is None or train.is_transition is None:
            return None
        return host_mean(as_array(train.is_transition, np.float64), valid)

    def baseline_metrics(self, rate, targets, model, loss):
        """The mean binary cross-entropy of the constant probability ``rate`` (what the loss is for the model)."""
        valid = valid_rows(targets, targets.phase_valid)
        if rate is None or valid is None or targets.is_transition is None:
            return {"baseline/transition_bce": None}
        p = float(np.clip(rate, BCE_EPS, 1.0 - BCE_EPS))
        y = as_array(targets.is_transition, np.float64)
        # log1p(-p) keeps precision for p close to 0.
        per_row = -(y * math.log(p) + (1.0 - y) * math.log1p(-p))
        return {"baseline/transition_bce": host_mean(per_row, valid)}

    def skill(self, metrics):
        """Against the loss (the mean BCE; comparable only without the focal option), where rows had targets."""
        n = finite(metrics.get("n/transition"))
        if n is None or n <= 0:
            return {"skill/transition": None}
        return {"skill/transition": skill_score(metrics.get(loss_key(self.name)),
                                                [metrics.get("baseline/transition_bce")])}

    # -- proper scores ---------------------------------------------------------------------------

    def baseline_forecasts(self, train, targets, known, ctx):
        rate = self.fit_baseline(train, ctx.model, ctx.loss)
        return {} if rate is None else {"base_rate": {"transition_prob": np.asarray([rate])}}

    def _scored(self, forecast, targets):
        valid = valid_rows(targets, targets.phase_valid)
        if valid is None or targets.is_transition is None or not valid.any():
            return None, None
        return held(forecast["transition_prob"], len(valid))[valid], as_array(targets.is_transition, np.float64)[valid]

    def proper_scores(self, forecast, targets, ctx):
        p, y = self._scored(forecast, targets)
        if p is None:
            return {"log_score": None, "brier": None, "average_precision": None}
        return {"log_score": mean_or_none(scores.binary_log_score(p, y)),
                "brier": mean_or_none(scores.binary_brier(p, y)),
                "average_precision": scores.average_precision(p, y)}

    def calibration(self, forecast, targets, ctx):
        p, y = self._scored(forecast, targets)
        return {} if p is None else {"reliability": scores.reliability(p, y > 0.5)}

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, outputs, model, loss):
        return {"transition_prob": jax.nn.sigmoid(transition_logit(outputs).astype(jnp.float32))}

    def columns(self, predictions, targets, ctx):
        return {"transition_prob": np.asarray(predictions["transition_prob"], np.float64),
                "actual/transition": actual(targets["is_transition"], targets["phase_valid"])}

    def describe(self, columns, i):
        return f"transition {columns['transition_prob'][i]:.3f}", []


TRANSITION = TransitionTask()
