"""Regime: the coarse operational phase of the anchor day, a K-way classification (K = 4 by default).

Loss (the original's ``_compute_losses``, regime branch): class-balanced, label-smoothed
cross-entropy of the last month's clamped logits, floored at ``regime_loss_floor``, plus
penalties that keep each row's and the batch's predicted distribution from collapsing.
Without any regime targets the original scores temporal consistency instead (a symmetric
KL between successive months); with targets but no valid row, a tiny regulariser.

Metrics: accuracy and balanced accuracy (mean recall over the classes present).
Baseline: the training split's most frequent class. Prediction: the class probabilities.

Proper scores of the probabilities (:mod:`han_jax.core.scores`): the multiclass log score,
the Brier score and the top-label expected calibration error, beside balanced accuracy;
against the training class frequencies ("climatology") and, in a backtest, the last
known phase held ("persistence").
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.config import LossConfig, ModelConfig
from han_jax.core import scores
from han_jax.core.batch import Targets
from han_jax.core.reductions import class_sums, masked_count, masked_sum, namespace, psum, ratio, sum_and_count
from han_jax.tasks.base import Task, actual, as_array, held, mean_or_none, skill_score, valid_rows


def regime_labels(phase_index, n_classes: int, phase_to_coarse: Sequence[int]):
    """Class labels for a ``n_classes``-way head from the 11 phase indices; jax or numpy arrays.

    A head with as many classes as phases reads the phase directly; any other size reads the
    original's coarse map (``[0,0,0,1,1,2,2,2,3,3,3]`` for 4 classes). Clipped into range, as the
    original's loss indexes.
    """
    xp = namespace(phase_index)
    phase = xp.clip(xp.asarray(phase_index).astype(xp.int32), 0, len(phase_to_coarse) - 1)
    if n_classes != len(phase_to_coarse):
        phase = xp.asarray(phase_to_coarse, xp.int32)[phase]
    return xp.clip(phase, 0, n_classes - 1)


def entropy(probs, axis: int = -1, eps: float = 1e-8):
    """``-sum p log(p + eps)``: the original adds eps inside the log, not a clamp."""
    return -jnp.sum(probs * jnp.log(probs + eps), axis=axis)


def class_weights(class_count):
    """The original's batch class weights: ``1/max(count, 1)`` normalised to sum to K."""
    k = class_count.shape[-1]
    weights = 1.0 / jnp.maximum(class_count, 1.0)
    return weights / jnp.sum(weights) * k


def weighted_smoothed_cross_entropy(logits, labels, weights, label_smoothing: float):
    """Per-row numerator and weight of ``torch.nn.functional.cross_entropy``.

    PyTorch's ``cross_entropy(weight=w, label_smoothing=e, reduction='mean')`` is
    ``sum_i [(1-e) w[y_i] (-log p_i[y_i]) + e/K sum_c w[c] (-log p_i[c])] / sum_i w[y_i]``:
    the smoothing term is weighted by every class weight but the normaliser only by the
    target's. This returns the bracket and ``w[y_i]`` per row; the caller divides their
    (masked) sums. The loss itself uses the equivalent per-class form,
    :func:`smoothed_cross_entropy_from_class_sums`, which merges across batches.

    Args:
      logits: [B, K] logits.
      labels: [B] int class indices.
      weights: [K] per-class weights.
      label_smoothing: e in [0, 1].

    Returns:
      (numerator [B], weight [B]).

    References:
      PyTorch ``torch.nn.functional.cross_entropy`` (label smoothing with class weights, since 1.10).
    """
    k = logits.shape[-1]
    neg_log_p = -jax.nn.log_softmax(logits, axis=-1)
    w_y = weights[labels]
    nll_y = jnp.take_along_axis(neg_log_p, labels[:, None], axis=-1)[:, 0]
    smooth = jnp.sum(weights[None, :] * neg_log_p, axis=-1)
    return (1.0 - label_smoothing) * w_y * nll_y + (label_smoothing / k) * smooth, w_y


def smoothed_cross_entropy_from_class_sums(label_nll, all_nll, class_count, weights, label_smoothing: float):
    """:func:`weighted_smoothed_cross_entropy`'s batch mean from per-class sums.

    ``sum_i numerator_i = sum_c w[c] ((1-e) S1[c] + (e/K) S2[c])`` and
    ``sum_i w[y_i] = sum_c w[c] count[c]``, so the cross-entropy of a set of rows needs only
    three additive per-class vectors, whatever the weights.

    Args:
      label_nll: S1 [K], sum of ``-log p_i[c]`` over the rows labelled c.
      all_nll: S2 [K], sum of ``-log p_i[c]`` over all rows.
      class_count: [K], rows per label.
      weights: [K].
      label_smoothing: e.

    Returns:
      The weighted, smoothed cross-entropy (0 when there are no rows).
    """
    k = class_count.shape[-1]
    numerator = jnp.sum(weights * ((1.0 - label_smoothing) * label_nll + (label_smoothing / k) * all_nll))
    denominator = jnp.sum(weights * class_count)
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def balanced_accuracy(class_correct, class_count):
    """Mean recall over the classes present (0 when none is); jax or numpy arrays."""
    xp = namespace(class_correct, class_count)
    present = class_count > 0
    recall = class_correct / xp.maximum(class_count, 1.0)
    return xp.sum(xp.where(present, recall, 0.0)) / xp.maximum(xp.sum(present), 1)


class RegimeTask(Task):
    name = "regime"
    headline_score = "log_score"
    outputs = ("regime_logits",)
    prior = 1.05  # the original's probe-based prior (MultiTaskLoss.DEFAULT_TASK_PRIORS)
    watch_collapse = True
    metric_counts = {"regime_accuracy": "n/regime", "regime_balanced_accuracy": "n/regime"}
    table_rows = ("regime_accuracy", "baseline/regime_accuracy", "regime_balanced_accuracy",
                  "baseline/regime_balanced_accuracy")

    def statistics(self, outputs, targets, row, config, axis_name):
        logits_seq = outputs["regime_logits"]
        _, m, k = logits_seq.shape
        last = logits_seq[:, -1, :]
        # The tiny fallback (no valid row): 1e-6 * mean square of the last logits over real rows.
        last_sq_sum, last_sq_count = sum_and_count(jnp.square(last), row[:, None], axis_name=axis_name)
        stats = {"last_sq_sum": last_sq_sum, "last_sq_count": last_sq_count}
        if targets.phase_index is None or targets.phase_valid is None:
            if m < 2:
                return stats
            # No regime targets at all: the original's symmetric-KL temporal consistency.
            logp_t = jax.nn.log_softmax(logits_seq[:, 1:], axis=-1)
            logp_prev = jax.nn.log_softmax(logits_seq[:, :-1], axis=-1)
            p_t, p_prev = jnp.exp(logp_t), jnp.exp(logp_prev)
            # kl_div(input=log q, target=p) = sum p (log p - log q); xlogy makes p=0 terms 0.
            kl_fwd_row = jnp.sum(jax.scipy.special.xlogy(p_t, p_t) - p_t * logp_prev, axis=(1, 2))
            kl_bwd_row = jnp.sum(jax.scipy.special.xlogy(p_prev, p_prev) - p_prev * logp_t, axis=(1, 2))
            # Per-class terms of the month entropies, kept per class so the finaliser knows K.
            neg_plogp = -p_t * jnp.log(jnp.maximum(p_t, 1e-8))  # [B, M-1, K]
            stats.update(
                kl_fwd_sum=masked_sum(kl_fwd_row, row, axis_name=axis_name),
                kl_bwd_sum=masked_sum(kl_bwd_row, row, axis_name=axis_name),
                n_rows=masked_count(kl_fwd_row, row, axis_name=axis_name),
                month_entropy_sum=class_sums(neg_plogp, row[:, None, None], axis_name=axis_name),
                month_entropy_count=masked_count(neg_plogp[..., 0], row[:, None], axis_name=axis_name),
            )
            return stats

        labels = regime_labels(targets.phase_index, k, config.phase_to_coarse)
        valid = row & targets.phase_valid.astype(bool)
        is_label = (labels[:, None] == jnp.arange(k)[None, :]) & valid[:, None]  # [B, K]
        clamped = jnp.clip(last, -config.regime_logit_clamp, config.regime_logit_clamp)
        neg_log_p = -jax.nn.log_softmax(clamped, axis=-1)
        probs = jax.nn.softmax(clamped, axis=-1)
        correct = (jnp.argmax(last, -1) == labels)[:, None] & is_label
        stats.update(
            class_count=psum(jnp.sum(is_label.astype(jnp.float32), axis=0), axis_name),
            class_correct=psum(jnp.sum(correct.astype(jnp.float32), axis=0), axis_name),
            label_nll_sum=class_sums(neg_log_p, is_label, axis_name=axis_name),
            all_nll_sum=class_sums(neg_log_p, valid[:, None], axis_name=axis_name),
            probs_sum=class_sums(probs, valid[:, None], axis_name=axis_name),
        )
        stats["entropy_sum"], stats["n_valid"] = sum_and_count(entropy(probs), valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        if "kl_fwd_sum" in s:
            log_k = math.log(s["month_entropy_sum"].shape[-1])
            kl_fwd = ratio(s["kl_fwd_sum"], s["n_rows"])  # reduction='batchmean': divide by rows
            kl_bwd = ratio(s["kl_bwd_sum"], s["n_rows"])
            mean_ent = ratio(jnp.sum(s["month_entropy_sum"]), s["month_entropy_count"])
            return 0.1 * (kl_fwd + kl_bwd) / 2 + 0.1 * jnp.abs(0.5 * log_k - mean_ent), jnp.float32(0.0)
        fallback = 1e-6 * ratio(s["last_sq_sum"], s["last_sq_count"])
        if "class_count" not in s:
            return fallback, jnp.float32(0.0)

        log_k = math.log(s["class_count"].shape[-1])
        n_valid = s["n_valid"]
        ce = smoothed_cross_entropy_from_class_sums(
            s["label_nll_sum"], s["all_nll_sum"], s["class_count"], class_weights(s["class_count"]),
            config.label_smoothing)
        mean_row_entropy = ratio(s["entropy_sum"], n_valid)
        batch_diversity = entropy(s["probs_sum"] / jnp.maximum(n_valid, 1.0))
        entropy_penalty = jax.nn.relu(0.5 * log_k - mean_row_entropy)
        diversity_penalty = jax.nn.relu(0.7 * log_k - batch_diversity)
        # Floor first, then NaN -> 0: a NaN cross-entropy counts 0, not the floor.
        floored = jnp.maximum(ce, config.regime_loss_floor)
        floored = jnp.where(jnp.isnan(floored), 0.0, floored)
        loss = (floored + config.regime_entropy_weight * entropy_penalty
                + config.regime_diversity_weight * diversity_penalty)
        return jnp.where(n_valid > 0, loss, fallback), n_valid

    def metrics(self, s, model):
        if "class_count" in s:
            correct, count = s["class_correct"], s["class_count"]
        else:
            xp = namespace(s["last_sq_sum"])
            correct = count = xp.zeros((model.n_regime_classes,), xp.float32)
        xp = namespace(correct, count)
        n = xp.sum(count)
        return {"regime_class_correct": correct, "regime_class_count": count, "n/regime": n,
                "regime_accuracy": ratio(xp.sum(correct), n),
                "regime_balanced_accuracy": balanced_accuracy(correct, count)}

    # -- baselines: the training split's majority class --------------------------------------------

    def _labels(self, targets: Targets, model: ModelConfig, loss: LossConfig) -> Optional[np.ndarray]:
        valid = valid_rows(targets, targets.phase_valid)
        if valid is None or targets.phase_index is None:
            return None
        return regime_labels(as_array(targets.phase_index, np.int64), model.n_regime_classes,
                             loss.phase_to_coarse)[valid]

    def fit_baseline(self, train, model, loss):
        """The most frequent class among the valid train rows (ties: the lowest class); None without one."""
        labels = self._labels(train, model, loss)
        if labels is None or labels.size == 0:
            return None
        # argmax returns the first maximum, i.e. the lowest class of a tie.
        return int(np.argmax(np.bincount(labels, minlength=model.n_regime_classes)))

    def baseline_metrics(self, majority, targets, model, loss):
        labels = self._labels(targets, model, loss)
        if majority is None or labels is None or labels.size == 0:
            accuracy = balanced = None
        else:
            accuracy = float(np.mean(labels == majority))
            present = np.unique(labels)
            # A constant predictor recalls all of its own class and none of any other,
            # so the mean recall over the present classes is 1/#present or 0.
            balanced = float(majority in present) / len(present)
        return {"baseline/regime_accuracy": accuracy, "baseline/regime_balanced_accuracy": balanced}

    def skill(self, metrics):
        def error(x):
            return None if x is None else 1.0 - x

        return {"skill/regime": skill_score(error(metrics.get("regime_balanced_accuracy")),
                                            [error(metrics.get("baseline/regime_balanced_accuracy"))])}

    # -- proper scores ---------------------------------------------------------------------------

    def baseline_forecasts(self, train, targets, known, ctx):
        k = ctx.model.n_regime_classes
        out = {}
        labels = self._labels(train, ctx.model, ctx.loss)
        if labels is not None and labels.size:
            out["climatology"] = {"regime_probs": (np.bincount(labels, minlength=k) / labels.size)[None, :]}
        if known is not None and known.last_phase_index is not None:
            last = int(regime_labels(np.asarray([known.last_phase_index]), k, ctx.loss.phase_to_coarse)[0])
            out["persistence"] = {"regime_probs": np.eye(k)[last][None, :]}
        return out

    def _scored(self, forecast, targets, ctx):
        labels = self._labels(targets, ctx.model, ctx.loss)
        valid = valid_rows(targets, targets.phase_valid)
        if labels is None or labels.size == 0:
            return None, None
        probs = held(forecast["regime_probs"], len(valid))[valid]
        return probs, labels

    def proper_scores(self, forecast, targets, ctx):
        probs, labels = self._scored(forecast, targets, ctx)
        if probs is None:
            return {"log_score": None, "brier": None, "ece": None, "balanced_accuracy": None}
        k = probs.shape[1]
        predicted = np.argmax(probs, axis=1)
        count = np.bincount(labels, minlength=k).astype(np.float64)
        correct = np.bincount(labels[predicted == labels], minlength=k).astype(np.float64)
        return {"log_score": mean_or_none(scores.categorical_log_score(probs, labels)),
                "brier": mean_or_none(scores.categorical_brier(probs, labels)),
                "ece": scores.expected_calibration_error(probs, labels),
                "balanced_accuracy": float(balanced_accuracy(correct, count))}

    def calibration(self, forecast, targets, ctx):
        probs, labels = self._scored(forecast, targets, ctx)
        if probs is None:
            return {}
        return {"reliability": scores.reliability(np.max(probs, axis=1), np.argmax(probs, axis=1) == labels)}

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, outputs, model, loss):
        return {"regime_probs": jax.nn.softmax(outputs["regime_logits"][:, -1].astype(jnp.float32), axis=-1)}

    def columns(self, predictions, targets, ctx):
        probs = np.asarray(predictions["regime_probs"], np.float64)
        cols = {f"regime_prob/{k}": probs[:, k] for k in range(probs.shape[1])}
        cols["regime_class"] = np.argmax(probs, axis=1).astype(np.float64)
        labels = regime_labels(np.asarray(targets["phase_index"]), probs.shape[1], ctx.loss.phase_to_coarse)
        cols["actual/regime_class"] = actual(labels, targets["phase_valid"])
        return cols

    def describe(self, columns, i):
        probs = [columns[k][i] for k in columns if k.startswith("regime_prob/")]
        return (f"regime probabilities [{', '.join(f'{p:.3f}' for p in probs)}] "
                f"(class {int(columns['regime_class'][i])})"), []

    def panels(self, columns):
        return [_probability_panel]


def _probability_panel(ax, columns, dates, marker):
    """Regime probabilities over the anchors, each run of days with one true class shaded in its colour."""
    true = columns["actual/regime_class"]
    n = len(true)
    start = 0
    for i in range(1, n + 1):
        if i == n or not (true[i] == true[start] or (np.isnan(true[i]) and np.isnan(true[start]))):
            if not np.isnan(true[start]):
                ax.axvspan(dates[start], dates[i - 1] + np.timedelta64(1, "D"), color=f"C{int(true[start])}",
                           alpha=0.15, lw=0)
            start = i
    n_classes = sum(k.startswith("regime_prob/") for k in columns)
    for k in range(n_classes):
        ax.plot(dates, columns[f"regime_prob/{k}"], color=f"C{k}", marker=marker, ms=3, label=f"class {k}")
    ax.set_ylim(0, 1)
    ax.set_title("regime probabilities (shaded: the true class)")
    ax.legend(fontsize=7, ncol=n_classes, loc="upper left")


REGIME = RegimeTask()
