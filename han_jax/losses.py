"""Per-task losses of the multi-resolution HAN, ported exactly from the original.

Reference: ML-OSINT commit 75d6392, ``analysis/train_multi_resolution.py``
(``_compute_losses``, ``_compute_autoregressive_forecast_loss``,
``zinb_nll_loss``, ``interpret_casualty_outputs_as_zinb``,
``TemporalRegularizer``).

Layout, after ``optax/losses``: each loss is a small pure function returning
per-element values; reductions are left to the caller and all go through
:func:`masked_sum` / :func:`masked_mean` / :func:`masked_moments`, which take
``axis_name``. Inside ``pmap`` those helpers ``psum`` sums and counts, so N
devices holding B/N rows each compute the same batch statistics (class counts,
means, variances) as one device holding all B rows: pmap correctness lives in
those functions and nowhere else.

Where the original selects rows with ``mask.nonzero()`` and branches on
``mask.any()``/``.item()``, han-jax multiplies by masks and selects with
``jnp.where``; the unselected branch is always computed with safe
denominators so that neither its value nor its gradient can be NaN.

Batch statistics across batches: every task loss is computed as
``finalize_losses(loss_statistics(batch))``. :func:`loss_statistics` reduces a
batch to additive sufficient statistics (sums, counts, per-class vectors) and
:class:`Moments` for the variances; :func:`combine_statistics` merges those of
disjoint batches exactly, and :func:`finalize_losses` applies the original's
floors, penalties, NaN replacements and fallbacks once. A whole validation or
test split scored batch by batch thus gets the losses of ONE batch holding the
whole split, for any batch size, padding and device count, while the training
objective of a batch is unchanged. One thing stays per batch:
:func:`sanitize_outputs` maps +-inf to +-float32 max only in an output that
holds a NaN somewhere in the *batch* (the original's ``nan_to_num`` when
``isnan().any()``); an inf in a batch without NaN stays inf even if another
batch of the split has one. The clamped heads do not see the difference and
most others are non-finite either way (squares of float32 max overflow too);
the exception is the no-regime-target KL term, NaN for an inf logit but a huge
finite value for float32 max.

Deliberate differences from the original, all for the sake of parity between
phases and devices rather than of the numbers:
  * Padding rows (``Targets.sample_mask`` False) are excluded from every
    reduction, including the fallbacks, exactly as if the row were absent.
  * The "NaN in outputs" warning becomes a boolean diagnostic.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from han_jax.batch import Targets
from han_jax.config import LossConfig

Array = jax.Array

# Outputs that carry a batch axis first; the NaN check ignores padding rows there.
_OUTPUT_KEYS = (
    "regime_logits",
    "anomaly_score",
    "casualty_pred",
    "casualty_var",
    "forecast_pred",
    "daily_forecast_pred",
)


# ---------------------------------------------------------------------------
# Masked reductions: the one place where pmap correctness is decided.
# ---------------------------------------------------------------------------


def _psum(x: Array, axis_name: Optional[str]) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def masked_sum(x: Array, where: Optional[Array] = None, *, axis=None, axis_name: Optional[str] = None) -> Array:
    """Sum of ``x`` where ``where`` holds, over ``axis`` (all axes by default) and (with ``axis_name``) all devices."""
    x = jnp.asarray(x, jnp.float32)
    if where is not None:
        x = jnp.where(jnp.broadcast_to(where, x.shape), x, 0.0)
    return _psum(jnp.sum(x, axis=axis), axis_name)


def masked_count(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> Array:
    """Number of elements of ``x`` selected by ``where`` (f32), across devices."""
    if where is None:
        n = jnp.float32(math.prod(jnp.shape(x)))
    else:
        n = jnp.sum(jnp.broadcast_to(where, jnp.shape(x)).astype(jnp.float32))
    return _psum(n, axis_name)


def masked_mean(
    x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None
) -> tuple[Array, Array]:
    """Mean of ``x`` over the elements ``where`` selects, and their count.

    ``where`` broadcasts against ``x`` (a row mask ``[B, 1, 1]`` selects whole
    rows). With no element selected the mean is 0 (not NaN) and the count 0,
    so callers can choose a fallback with ``jnp.where`` without NaN gradients.
    """
    total = masked_sum(x, where, axis_name=axis_name)
    n = masked_count(x, where, axis_name=axis_name)
    return total / jnp.maximum(n, 1.0), n


def _namespace(*xs):
    """``numpy`` for host values (numpy, Python numbers), ``jax.numpy`` once any is a jax array or tracer.

    Lets :class:`Moments` merge float64 numpy accumulators on the host without
    ``jax.numpy`` silently casting them to f32 (x64 is off by default).
    """
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


@flax.struct.dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations about the mean) of a set of values.

    A pytree, so it passes through ``jit``/``pmap``/``device_get``. Two sets'
    Moments merge exactly (:meth:`merge`); the variance needs only these three.

    Attributes:
      count: number of values (f32 scalar).
      mean: their mean, 0 when ``count`` is 0.
      m2: ``sum (x - mean)^2``.
    """

    count: Array
    mean: Array
    m2: Array

    def variance(self, ddof: int = 1) -> Array:
        """``m2 / max(count - ddof, 1)``: :func:`masked_var`'s value (0, not NaN, when ``count <= ddof``)."""
        xp = _namespace(self.count, self.m2)
        return self.m2 / xp.maximum(self.count - ddof, 1.0)

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of two disjoint sets (Chan, Golub & LeVeque's parallel formula).

        Args:
          other: Moments of the other set.

        Returns:
          ``count = na + nb``, ``mean = ma + delta nb / n``,
          ``m2 = m2a + m2b + delta^2 na nb / n`` with ``delta = mb - ma``.
        """
        xp = _namespace(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        count = self.count + other.count
        # count is 0 only when both sets are empty (means and M2 all 0): dividing by
        # max(count, 1) keeps that case at 0 instead of 0/0.
        frac_other = other.count / xp.maximum(count, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * frac_other
        m2 = self.m2 + other.m2 + delta * delta * self.count * frac_other
        return Moments(count=count, mean=mean, m2=m2)


def masked_moments(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> Moments:
    """:class:`Moments` of the elements of ``x`` that ``where`` selects, across devices.

    Two passes within the batch, as :func:`masked_var`: the (global) mean
    first, then the squared deviations about it, which is more accurate in f32
    than sum-of-squares minus square-of-sum.

    Args:
      x: values, any shape.
      where: mask broadcasting against ``x``; all elements when None.
      axis_name: the ``pmap`` axis; the moments are then over all devices.

    Returns:
      Moments with f32 scalar fields.
    """
    mean, n = masked_mean(x, where, axis_name=axis_name)
    sq = jnp.square(jnp.asarray(x, jnp.float32) - mean)
    m2 = masked_sum(sq, where, axis_name=axis_name)
    return Moments(count=n, mean=mean, m2=m2)


def masked_var(
    x: Array, where: Optional[Array] = None, *, ddof: int = 1, axis_name: Optional[str] = None
) -> tuple[Array, Array]:
    """Variance (``ddof=1`` like ``torch.var``) over the selected elements, and their count.

    Two passes (mean, then squared deviations) for accuracy. Where ``count <=
    ddof`` torch returns NaN; here the value is 0 and callers test the count.
    """
    moments = masked_moments(x, where, axis_name=axis_name)
    return moments.variance(ddof), moments.count


# ---------------------------------------------------------------------------
# Per-element losses.
# ---------------------------------------------------------------------------


def weighted_smoothed_cross_entropy(
    logits: Array, labels: Array, class_weights: Array, label_smoothing: float
) -> tuple[Array, Array]:
    """Per-row numerator and weight of ``torch.nn.functional.cross_entropy``.

    PyTorch's ``cross_entropy(weight=w, label_smoothing=e, reduction='mean')``
    is ``sum_i [(1-e) w[y_i] (-log p_i[y_i]) + e/K sum_c w[c] (-log p_i[c])]
    / sum_i w[y_i]``: the smoothing term is weighted by every class weight but
    the normaliser only by the target's. This returns the bracket and
    ``w[y_i]`` per row; the caller divides their (masked) sums. (The regime
    loss uses the equivalent per-class form,
    :func:`smoothed_cross_entropy_from_class_sums`, which merges across batches.)

    Args:
      logits: [B, K] logits.
      labels: [B] int class indices.
      class_weights: [K] per-class weights.
      label_smoothing: e in [0, 1].

    Returns:
      (numerator [B], weight [B]).

    References:
      PyTorch ``torch.nn.functional.cross_entropy`` (label smoothing with
      class weights, since 1.10).
    """
    k = logits.shape[-1]
    neg_log_p = -jax.nn.log_softmax(logits, axis=-1)
    w_y = class_weights[labels]
    nll_y = jnp.take_along_axis(neg_log_p, labels[:, None], axis=-1)[:, 0]
    smooth = jnp.sum(class_weights[None, :] * neg_log_p, axis=-1)
    numerator = (1.0 - label_smoothing) * w_y * nll_y + (label_smoothing / k) * smooth
    return numerator, w_y


def entropy(probs: Array, axis: int = -1, eps: float = 1e-8) -> Array:
    """``-sum p log(p + eps)``: the original adds eps inside the log, not a clamp."""
    return -jnp.sum(probs * jnp.log(probs + eps), axis=axis)


def zinb_parameters(casualty_pred: Array, casualty_var: Array) -> tuple[Array, Array, Array]:
    """Reads the casualty head as ZINB parameters (``interpret_casualty_outputs_as_zinb``).

    Args:
      casualty_pred: [B, 3]; channel 0 is the zero-inflation logit, channel 1 log mu.
      casualty_var: [B, 3]; channel 0 gives the dispersion theta.

    Returns:
      (pi, mu, theta), each [B].
    """
    # Clamps bound sigmoid saturation and exp overflow (exp(12) ~ 1.6e5).
    pi = jax.nn.sigmoid(jnp.clip(casualty_pred[:, 0], -10.0, 10.0))
    mu = jnp.exp(jnp.clip(casualty_pred[:, 1], -5.0, 12.0))
    theta = jnp.clip(jax.nn.softplus(casualty_var[:, 0]), 0.1, 100.0)
    return pi, mu, theta


def zinb_nll(
    y: Array, pi: Array, mu: Array, theta: Array, eps: float = 1e-8, max_loss: float = 20.0
) -> Array:
    """Per-row zero-inflated negative binomial negative log-likelihood.

    ``P(0) = pi + (1-pi) NB(0)``, ``P(k) = (1-pi) NB(k)`` with mean ``mu`` and
    dispersion ``theta`` (variance ``mu + mu^2/theta``).

    Args:
      y: [B] non-negative targets (scaled counts, need not be integers).
      pi, mu, theta: [B] ZINB parameters.
      eps: clamp of pi to [eps, 1-eps] and of mu, theta from below.
      max_loss: per-row NLL is clamped to [0, max_loss]; NaN becomes max_loss.

    Returns:
      [B] NLL values.

    References:
      Original ``zinb_nll_loss``; ZINB as in the VIEWS conflict-forecasting
      methodology.
    """
    pi = jnp.clip(pi, eps, 1.0 - eps)
    mu = jnp.maximum(mu, eps)
    theta = jnp.maximum(theta, eps)
    log_theta_ratio = jnp.log(theta) - jnp.log(theta + mu)
    log_nb_zero = theta * log_theta_ratio
    log_pi = jnp.log(pi)
    log_one_minus_pi = jnp.log(1.0 - pi)
    # log(pi + (1-pi) NB(0)) through logsumexp, as the original, for stability.
    log_prob_zero = jnp.logaddexp(log_pi, log_one_minus_pi + log_nb_zero)
    k = jnp.maximum(y, 0.0)
    log_nb = (
        jax.lax.lgamma(k + theta)
        - jax.lax.lgamma(theta)
        - jax.lax.lgamma(k + 1.0)
        + theta * log_theta_ratio
        + k * (jnp.log(mu) - jnp.log(theta + mu))
    )
    log_prob = jnp.where(y == 0, log_prob_zero, log_one_minus_pi + log_nb)
    nll = jnp.clip(-log_prob, 0.0, max_loss)
    return jnp.where(jnp.isnan(nll), max_loss, nll)


def sigmoid_focal_loss(logits: Array, labels: Array, alpha: float, gamma: float) -> Array:
    """Per-row binary focal loss as the original's ``FocalLoss`` (ML-OSINT HEAD).

    ``alpha_t (1 - p_t)^gamma BCE`` with ``p_t = exp(-BCE)``.

    References:
      Lin et al. 2017, "Focal Loss for Dense Object Detection".
    """
    bce = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
    p_t = jnp.exp(-bce)
    alpha_t = alpha * labels + (1.0 - alpha) * (1.0 - labels)
    return alpha_t * jnp.power(1.0 - p_t, gamma) * bce


# ---------------------------------------------------------------------------
# Task losses as sufficient statistics.
#
# Each task is split in two: ``_<task>_statistics`` reduces one batch to named
# sums, counts and Moments (everything that depends on the rows), and
# ``_finalize_<task>`` turns those into the loss with the original's floors,
# penalties, NaN replacements and fallbacks. The key set of a task's statistics
# records which static branch it took (targets present or None, M >= 2), so the
# finalizer needs nothing else but the LossConfig.
# ---------------------------------------------------------------------------


class LossDiagnostics(NamedTuple):
    """What ``compute_losses`` saw, for metrics and reports.

    Attributes:
      nan_in_outputs: True if any model output held NaN (replaced by 0 first).
      n_valid: per task, the number of rows (positions for forecast) the
        task's main branch was computed on, across devices; 0 means the
        fallback was used.
    """

    nan_in_outputs: Array
    n_valid: dict


def regime_labels(phase_index: Array, n_classes: int, phase_to_coarse) -> Array:
    """Class labels for a ``n_classes``-way regime head from the 11 phase indices.

    A head with as many classes as phases reads the phase directly; any other size
    reads the original's coarse map (``[0,0,0,1,1,2,2,2,3,3,3]`` for 4 classes).
    """
    phase = jnp.clip(phase_index.astype(jnp.int32), 0, len(phase_to_coarse) - 1)
    if n_classes != len(phase_to_coarse):
        phase = jnp.asarray(phase_to_coarse, jnp.int32)[phase]
    return jnp.clip(phase, 0, n_classes - 1)


def _ratio(total, count):
    """``total / max(count, 1)``: :func:`masked_mean`'s division, 0 for an empty selection."""
    return total / jnp.maximum(count, 1.0)


def _sum_and_count(x: Array, where: Array, axis_name: Optional[str]) -> tuple[Array, Array]:
    return masked_sum(x, where, axis_name=axis_name), masked_count(x, where, axis_name=axis_name)


def _class_sums(x: Array, where: Array, axis_name: Optional[str]) -> Array:
    """Per-class sums ``[K]`` of ``x [B, K]`` over the rows/entries ``where`` selects."""
    x = jnp.where(jnp.broadcast_to(where, x.shape), x, 0.0)
    return _psum(jnp.sum(x.reshape(-1, x.shape[-1]), axis=0), axis_name)


def regime_class_weights(class_count: Array) -> Array:
    """The original's batch class weights: ``1/max(count, 1)`` normalised to sum to K."""
    k = class_count.shape[-1]
    weights = 1.0 / jnp.maximum(class_count, 1.0)
    return weights / jnp.sum(weights) * k


def smoothed_cross_entropy_from_class_sums(
    label_nll: Array, all_nll: Array, class_count: Array, class_weights: Array, label_smoothing: float
) -> Array:
    """:func:`weighted_smoothed_cross_entropy`'s batch mean from per-class sums.

    ``sum_i numerator_i = sum_c w[c] ((1-e) S1[c] + (e/K) S2[c])`` and
    ``sum_i w[y_i] = sum_c w[c] count[c]``, so the cross-entropy of a set of
    rows needs only three additive per-class vectors, whatever the weights.

    Args:
      label_nll: S1 [K], sum of ``-log p_i[c]`` over the rows labelled c.
      all_nll: S2 [K], sum of ``-log p_i[c]`` over all rows.
      class_count: [K], rows per label.
      class_weights: [K].
      label_smoothing: e.

    Returns:
      The weighted, smoothed cross-entropy (0 when there are no rows).
    """
    k = class_count.shape[-1]
    numerator = jnp.sum(class_weights * ((1.0 - label_smoothing) * label_nll + (label_smoothing / k) * all_nll))
    denominator = jnp.sum(class_weights * class_count)
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def _regime_statistics(o, targets, row, config, axis_name):
    logits_seq = o["regime_logits"]
    b, m, k = logits_seq.shape
    last = logits_seq[:, -1, :]

    def fallback_statistics():
        # The tiny fallback: 1e-6 * mean square of the last logits over real rows.
        total, count = _sum_and_count(jnp.square(last), row[:, None], axis_name)
        return {"last_sq_sum": total, "last_sq_count": count}

    if targets.phase_index is None or targets.phase_valid is None:
        if m < 2:
            return fallback_statistics()
        # No regime targets at all: the original's symmetric-KL temporal consistency.
        logp_t = jax.nn.log_softmax(logits_seq[:, 1:], axis=-1)
        logp_prev = jax.nn.log_softmax(logits_seq[:, :-1], axis=-1)
        p_t, p_prev = jnp.exp(logp_t), jnp.exp(logp_prev)
        # kl_div(input=log q, target=p) = sum p (log p - log q); xlogy makes p=0 terms 0.
        kl_fwd_row = jnp.sum(jax.scipy.special.xlogy(p_t, p_t) - p_t * logp_prev, axis=(1, 2))
        kl_bwd_row = jnp.sum(jax.scipy.special.xlogy(p_prev, p_prev) - p_prev * logp_t, axis=(1, 2))
        # Per-class terms of the month entropies, kept per class so the finalizer knows K.
        neg_plogp = -p_t * jnp.log(jnp.maximum(p_t, 1e-8))  # [B, M-1, K]
        return {
            "kl_fwd_sum": masked_sum(kl_fwd_row, row, axis_name=axis_name),
            "kl_bwd_sum": masked_sum(kl_bwd_row, row, axis_name=axis_name),
            "n_rows": masked_count(kl_fwd_row, row, axis_name=axis_name),
            "month_entropy_sum": _class_sums(neg_plogp, row[:, None, None], axis_name),
            "month_entropy_count": masked_count(neg_plogp[..., 0], row[:, None], axis_name=axis_name),
        }

    stats = fallback_statistics()  # used when no row is valid
    labels = regime_labels(targets.phase_index, k, config.phase_to_coarse)
    valid = row & targets.phase_valid.astype(bool)
    is_label = (labels[:, None] == jnp.arange(k)[None, :]) & valid[:, None]  # [B, K]

    clamped = jnp.clip(last, -config.regime_logit_clamp, config.regime_logit_clamp)
    neg_log_p = -jax.nn.log_softmax(clamped, axis=-1)
    probs = jax.nn.softmax(clamped, axis=-1)
    stats.update(
        class_count=_psum(jnp.sum(is_label.astype(jnp.float32), axis=0), axis_name),
        label_nll_sum=_class_sums(neg_log_p, is_label, axis_name),
        all_nll_sum=_class_sums(neg_log_p, valid[:, None], axis_name),
        probs_sum=_class_sums(probs, valid[:, None], axis_name),
    )
    stats["entropy_sum"], stats["n_valid"] = _sum_and_count(entropy(probs), valid, axis_name)
    return stats


def _finalize_regime(s, config):
    if "kl_fwd_sum" in s:
        log_k = math.log(s["month_entropy_sum"].shape[-1])
        kl_fwd = _ratio(s["kl_fwd_sum"], s["n_rows"])  # reduction='batchmean': divide by rows
        kl_bwd = _ratio(s["kl_bwd_sum"], s["n_rows"])
        mean_ent = _ratio(jnp.sum(s["month_entropy_sum"]), s["month_entropy_count"])
        return 0.1 * (kl_fwd + kl_bwd) / 2 + 0.1 * jnp.abs(0.5 * log_k - mean_ent), jnp.float32(0.0)
    fallback = 1e-6 * _ratio(s["last_sq_sum"], s["last_sq_count"])
    if "class_count" not in s:
        return fallback, jnp.float32(0.0)

    log_k = math.log(s["class_count"].shape[-1])
    n_valid = s["n_valid"]
    class_weights = regime_class_weights(s["class_count"])
    ce = smoothed_cross_entropy_from_class_sums(
        s["label_nll_sum"], s["all_nll_sum"], s["class_count"], class_weights, config.label_smoothing
    )
    mean_row_entropy = _ratio(s["entropy_sum"], n_valid)
    batch_diversity = entropy(s["probs_sum"] / jnp.maximum(n_valid, 1.0))
    entropy_penalty = jax.nn.relu(0.5 * log_k - mean_row_entropy)
    diversity_penalty = jax.nn.relu(0.7 * log_k - batch_diversity)

    # Floor first, then NaN -> 0: a NaN cross-entropy counts 0, not the floor.
    floored = jnp.maximum(ce, config.regime_loss_floor)
    floored = jnp.where(jnp.isnan(floored), 0.0, floored)
    loss = floored + config.regime_entropy_weight * entropy_penalty + config.regime_diversity_weight * diversity_penalty
    return jnp.where(n_valid > 0, loss, fallback), n_valid


def _transition_statistics(o, targets, row, config, axis_name):
    score_last = o["anomaly_score"][:, -1, 0]
    stats = {}
    stats["score_sq_sum"], stats["n_rows"] = _sum_and_count(jnp.square(score_last), row, axis_name)
    if targets.is_transition is None or targets.phase_valid is None:
        return stats
    valid = row & targets.phase_valid.astype(bool)
    logits = jnp.clip(score_last, -50.0, 50.0)
    labels = targets.is_transition.astype(jnp.float32)
    if config.transition_focal:
        per_row = sigmoid_focal_loss(logits, labels, config.focal_alpha, config.focal_gamma)
    else:
        per_row = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
    stats["loss_sum"], stats["n_valid"] = _sum_and_count(per_row, valid, axis_name)
    return stats


def _finalize_transition(s, config):
    fallback = 1e-6 * _ratio(s["score_sq_sum"], s["n_rows"])
    if "loss_sum" not in s:
        return fallback, jnp.float32(0.0)
    n_valid = s["n_valid"]
    loss = _ratio(s["loss_sum"], n_valid)
    loss = jnp.where(jnp.isnan(loss), 0.0, loss)
    return jnp.where(n_valid > 0, loss, fallback), n_valid


def _casualty_statistics(o, targets, row, config, axis_name):
    pred_last, var_last = o["casualty_pred"][:, -1, :], o["casualty_var"][:, -1, :]
    stats = {
        "pi_reg_sum": masked_sum(jnp.square(jax.nn.sigmoid(pred_last[:, 0]) - 0.5), row, axis_name=axis_name),
        "log_mu_sq_sum": masked_sum(jnp.square(pred_last[:, 1]), row, axis_name=axis_name),
        "n_rows": masked_count(pred_last[:, 0], row, axis_name=axis_name),
    }
    if targets.fatalities is None or targets.casualty_valid is None:
        return stats
    stats["theta_reg_sum"] = masked_sum(jnp.square(jax.nn.softplus(var_last[:, 0]) - 1.0), row, axis_name=axis_name)
    valid = row & targets.casualty_valid.astype(bool)
    # Monthly fatalities are O(1e3-1e4); the original scores them /1000.
    y = targets.fatalities.astype(jnp.float32) / config.casualty_target_scale
    y = jnp.where(valid, y, 1.0)  # keep lgamma of padding/invalid rows finite
    pi, mu, theta = zinb_parameters(pred_last, var_last)
    stats["nll_sum"], stats["n_valid"] = _sum_and_count(zinb_nll(y, pi, mu, theta), valid, axis_name)
    return stats


def _finalize_casualty(s, config):
    pi_reg = _ratio(s["pi_reg_sum"], s["n_rows"])
    log_mu_reg = 0.01 * _ratio(s["log_mu_sq_sum"], s["n_rows"])
    if "nll_sum" not in s:
        return 0.01 * (pi_reg + log_mu_reg), jnp.float32(0.0)
    theta_reg = _ratio(s["theta_reg_sum"], s["n_rows"])
    fallback = 0.01 * (pi_reg + log_mu_reg + theta_reg)
    n_valid = s["n_valid"]
    return jnp.where(n_valid > 0, _ratio(s["nll_sum"], n_valid), fallback), n_valid


def _anomaly_statistics(o, targets, row, config, axis_name):
    score_last = o["anomaly_score"][:, -1, 0]
    stats = {}
    stats["score_sq_sum"], stats["n_rows"] = _sum_and_count(jnp.square(score_last), row, axis_name)
    if targets.anomaly is None or targets.anomaly_valid is None:
        return stats
    valid = row & targets.anomaly_valid.astype(bool)
    pred = jnp.clip(score_last, -10.0, 10.0)
    target = jnp.where(valid, targets.anomaly.astype(jnp.float32), 0.0)
    stats["sq_err_sum"], stats["n_valid"] = _sum_and_count(jnp.square(pred - target), valid, axis_name)
    stats["pred"] = masked_moments(pred, valid, axis_name=axis_name)
    stats["target"] = masked_moments(target, valid, axis_name=axis_name)
    return stats


def _finalize_anomaly(s, config):
    sq_mean = _ratio(s["score_sq_sum"], s["n_rows"])
    if "sq_err_sum" not in s:
        return 0.01 * sq_mean, jnp.float32(0.0)
    n_valid = s["n_valid"]
    mse = _ratio(s["sq_err_sum"], n_valid)
    mse = jnp.where(jnp.isnan(mse), 0.0, mse)
    var_pred, var_target = s["pred"].variance(), s["target"].variance()
    # torch.var of one element is NaN and `NaN > 1e-6` is False: no penalty.
    use_penalty = (n_valid >= 2) & (var_target > 1e-6)
    penalty = jnp.where(use_penalty, jax.nn.relu(0.5 - var_pred / (var_target + 1e-6)), 0.0)
    loss = mse + 0.1 * penalty
    return jnp.where(n_valid > 0, loss, 1e-6 * sq_mean), n_valid


def _per_row_var_over_months(x: Array) -> Array:
    """``x.var(dim=1)`` with ddof=1 per row and feature: [B, M, F] -> [B, F]."""
    mean = jnp.mean(x, axis=1, keepdims=True)
    return jnp.sum(jnp.square(x - mean), axis=1) / (x.shape[1] - 1)


def _temporal_statistics(x: Array, row: Array, axis_name: Optional[str]) -> dict:
    """Month-to-month squared steps and per-row month variances of ``x [B, M, F]`` (M >= 2).

    The month variance is a per-row quantity whose masked *mean* is taken, so
    it travels as a sum and a count, not as Moments.
    """
    stats = {}
    stats["smooth_sum"], stats["smooth_count"] = _sum_and_count(
        jnp.square(x[:, 1:] - x[:, :-1]), row[:, None, None], axis_name
    )
    stats["month_var_sum"], stats["month_var_count"] = _sum_and_count(
        _per_row_var_over_months(x), row[:, None], axis_name
    )
    return stats


def _forecast_statistics(o, targets, row, config, axis_name):
    pred = o["forecast_pred"]
    b, m, f_pred = pred.shape
    row3 = row[:, None, None]
    stats = {}
    stats["pred_sq_sum"], stats["pred_sq_count"] = _sum_and_count(jnp.square(pred), row3, axis_name)
    if targets.forecast_targets is None or targets.forecast_masks is None:
        if m >= 2:
            stats.update(_temporal_statistics(pred, row, axis_name))
        return stats

    k = min(f_pred, targets.forecast_targets.shape[-1])
    p = pred[..., :k]
    t = targets.forecast_targets[..., :k].astype(jnp.float32)
    valid = targets.forecast_masks[..., :k].astype(bool) & row3
    t = jnp.where(valid, t, 0.0)
    stats["sq_err_sum"], stats["n_valid"] = _sum_and_count(jnp.square(p - t), valid, axis_name)
    stats["pred"] = masked_moments(p, valid, axis_name=axis_name)
    stats["target"] = masked_moments(t, valid, axis_name=axis_name)
    if m >= 2:
        stats.update(_temporal_statistics(p, row, axis_name))
    return stats


def _finalize_forecast(s, config):
    tiny = 1e-6 * _ratio(s["pred_sq_sum"], s["pred_sq_count"])
    has_months = "smooth_sum" in s
    if "sq_err_sum" not in s:
        if not has_months:
            return tiny, jnp.float32(0.0)
        smooth = _ratio(s["smooth_sum"], s["smooth_count"])
        var_mean = _ratio(s["month_var_sum"], s["month_var_count"])
        return 0.01 * smooth + 0.1 * jax.nn.relu(0.5 - var_mean), jnp.float32(0.0)

    n_valid = s["n_valid"]
    mse = _ratio(s["sq_err_sum"], n_valid)
    var_pred, var_target = s["pred"].variance(), s["target"].variance()
    use_penalty = (n_valid >= 2) & (var_target > 1e-6)
    variance_penalty = jnp.where(use_penalty, 0.5 * jax.nn.relu(0.3 - var_pred / (var_target + 1e-6)), 0.0)
    if has_months:
        smooth = 0.01 * _ratio(s["smooth_sum"], s["smooth_count"])
        temporal_var = _ratio(s["month_var_sum"], s["month_var_count"])
        temporal_penalty = 0.1 * jax.nn.relu(0.1 - temporal_var)
    else:
        smooth = temporal_penalty = jnp.float32(0.0)
    total = jnp.maximum(mse + smooth + variance_penalty + temporal_penalty, 0.01)
    return jnp.where(n_valid > 0, total, tiny), n_valid


def _daily_forecast_statistics(o, targets, row, config, axis_name):
    pred = o["daily_forecast_pred"]
    b, h, _ = pred.shape
    row3 = row[:, None, None]
    stats = {}
    stats["pred_sq_sum"], stats["pred_sq_count"] = _sum_and_count(jnp.square(pred), row3, axis_name)
    if config.daily_forecast_latent:
        if h > 1:
            stats["smooth_sum"], stats["smooth_count"] = _sum_and_count(
                jnp.square(pred[:, 1:] - pred[:, :-1]), row3, axis_name
            )
        return stats
    if targets.daily_forecast_targets is None:
        return stats
    t = targets.daily_forecast_targets.astype(jnp.float32)
    valid = t > -900.0
    if targets.daily_forecast_masks is not None:
        valid = valid & targets.daily_forecast_masks.astype(bool)
    valid = valid & row3
    k = min(pred.shape[-1], t.shape[-1])
    valid = valid[..., :k]
    stats["sq_err_sum"], stats["n_valid"] = _sum_and_count(
        jnp.square(pred[..., :k] - jnp.where(valid, t[..., :k], 0.0)), valid, axis_name
    )
    return stats


def _finalize_daily_forecast(s, config):
    sq_mean = _ratio(s["pred_sq_sum"], s["pred_sq_count"])
    if config.daily_forecast_latent:
        if "smooth_sum" in s:
            return _ratio(s["smooth_sum"], s["smooth_count"]) + 0.01 * sq_mean, jnp.float32(0.0)
        return 0.01 * sq_mean, jnp.float32(0.0)
    if "sq_err_sum" not in s:
        return 1e-6 * sq_mean, jnp.float32(0.0)
    n_valid = s["n_valid"]
    return jnp.where(n_valid > 0, _ratio(s["sq_err_sum"], n_valid), 1e-6 * sq_mean), n_valid


# task -> (the outputs it scores, batch -> statistics, statistics -> (loss, n_valid)).
_TASKS = {
    "regime": (("regime_logits",), _regime_statistics, _finalize_regime),
    "transition": (("anomaly_score",), _transition_statistics, _finalize_transition),
    "casualty": (("casualty_pred", "casualty_var"), _casualty_statistics, _finalize_casualty),
    "anomaly": (("anomaly_score",), _anomaly_statistics, _finalize_anomaly),
    "forecast": (("forecast_pred",), _forecast_statistics, _finalize_forecast),
    "daily_forecast": (("daily_forecast_pred",), _daily_forecast_statistics, _finalize_daily_forecast),
}


def _scored_tasks(out: Mapping[str, Array]) -> list[str]:
    """The tasks a batch is scored on: all but daily_forecast, which needs its head."""
    return [name for name in _TASKS if name != "daily_forecast" or "daily_forecast_pred" in out]


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------


def finite_or_zero_grad(fn):
    """Wraps ``fn(x) -> (loss, aux)`` so that a non-finite loss sends back zero gradient.

    ``aggregate`` excludes a NaN/inf task with a zero cotangent, but inside the
    task ``0 * NaN`` is still NaN (e.g. the square of a NaN target's
    residual), so the exclusion alone would poison every parameter. In torch
    an excluded loss is simply not in the graph; here the backward pass of the
    task selects (not multiplies) zeros when its loss is not finite.
    """

    @jax.custom_vjp
    def wrapped(x):
        return fn(x)

    def fwd(x):
        out, vjp = jax.vjp(fn, x)
        return out, (vjp, out[0])

    def bwd(res, g):
        vjp, loss = res
        (gx,) = vjp(g)
        ok = jnp.isfinite(loss)
        return (jax.tree_util.tree_map(lambda v: jnp.where(ok, v, jnp.zeros_like(v)), gx),)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def sanitize_outputs(outputs: Mapping[str, Array], row: Array, axis_name: Optional[str] = None):
    """Casts outputs to f32 and replaces NaN the way the original does.

    The original runs ``torch.nan_to_num(x, nan=0.0)`` on an output only when
    it holds a NaN; that call also maps +-inf to the largest finite values, so
    han-jax does the same, per output, with ``jnp.where``.

    Padding rows (``row`` False) of the batch-leading outputs are zeroed first.

    Returns:
      (clean outputs, scalar bool: some output held NaN on a real row).
    """
    clean = {}
    flags = []
    for key, value in outputs.items():
        if not hasattr(value, "dtype") or not jnp.issubdtype(value.dtype, jnp.floating):
            clean[key] = value
            continue
        x = value.astype(jnp.float32)
        if key in _OUTPUT_KEYS and x.ndim >= 1 and x.shape[0] == row.shape[0]:
            # Padding rows become 0 before anything, so that nothing in them (not even
            # NaN) reaches a value or a gradient.
            x = jnp.where(row.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
        isnan = jnp.isnan(x)
        has_nan = _psum(jnp.any(isnan).astype(jnp.int32), axis_name) > 0
        clean[key] = jnp.where(has_nan, jnp.nan_to_num(x, nan=0.0), x)
        flags.append(has_nan)
    nan_in_outputs = jnp.any(jnp.stack(flags)) if flags else jnp.array(False)
    return clean, nan_in_outputs


def _prepare(outputs: Mapping[str, Array], targets: Targets, axis_name: Optional[str]):
    row = targets.sample_mask.astype(bool)
    out, nan_in_outputs = sanitize_outputs(outputs, row, axis_name)
    chex.assert_rank(out["regime_logits"], 3)
    chex.assert_shape(row, (out["regime_logits"].shape[0],))
    return out, row, nan_in_outputs


def loss_statistics(
    outputs: Mapping[str, Array],
    targets: Targets,
    config: LossConfig = LossConfig(),
    *,
    axis_name: Optional[str] = None,
) -> dict:
    """Sufficient statistics of one batch for every task loss.

    Statistics of disjoint sets of rows merge exactly with
    :func:`combine_statistics`, and :func:`finalize_losses` of the merged
    statistics gives the losses of one batch holding all those rows. So a split
    scored batch by batch (any batch size, any padding, any device count) gets
    the numbers of a single batch, even though the losses themselves use batch
    statistics (class counts, variances, mean probabilities, fallbacks).

    Per task, a dict of f32 arrays that add across batches (sums and counts,
    per-class ``[K]`` vectors) and :class:`Moments` (``"pred"``, ``"target"``).
    The keys also record the task's static branch (e.g. targets ``None``), so
    statistics are only combined with statistics of the same branch and shapes.

    Args:
      outputs: the model's output dict, as for :func:`compute_losses`.
      targets: the batch's :class:`~han_jax.batch.Targets`.
      config: loss options; :func:`finalize_losses` must get the same.
      axis_name: the ``pmap`` axis: statistics are then over all devices
        (every device returns the same).

    Returns:
      ``{task: {statistic name: array or Moments}}``.
    """
    out, row, _ = _prepare(outputs, targets, axis_name)
    return {
        name: _TASKS[name][1]({k: out[k] for k in _TASKS[name][0]}, targets, row, config, axis_name)
        for name in _scored_tasks(out)
    }


def combine_statistics(a: dict, b: dict) -> dict:
    """Statistics of the union of two disjoint sets of rows.

    Arrays add; :class:`Moments` merge with Chan et al.'s parallel formula.
    Works on jax arrays and on numpy arrays, keeping numpy's dtype (accumulate
    a split on the host in float64, see :func:`statistics_to_host`).

    Args:
      a, b: outputs of :func:`loss_statistics` (or of this function) with the
        same structure.

    Returns:
      The merged statistics, same structure.
    """
    def merge(x, y):
        return x.merge(y) if isinstance(x, Moments) else x + y

    return jax.tree_util.tree_map(merge, a, b, is_leaf=lambda x: isinstance(x, Moments))


def statistics_to_host(stats: dict) -> dict:
    """Fetches statistics to the host as numpy float64, to accumulate with :func:`combine_statistics`.

    Per-batch sums are f32 on the device; summing thousands of them in f32
    would lose digits, so the running totals of a split are kept in float64.
    """
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(stats))


def finalize_losses(stats: dict, config: LossConfig = LossConfig()) -> tuple[dict, dict]:
    """Task losses from (merged) statistics, with the original's floors, penalties and fallbacks.

    Accepts jax or numpy statistics (the host path passes float64 numpy); the
    arithmetic is ``jax.numpy``, so the losses come back as f32 jax arrays.

    Args:
      stats: :func:`loss_statistics` of one batch, or several merged by
        :func:`combine_statistics`.
      config: the loss options the statistics were computed with.

    Returns:
      (``{task: f32 loss}``, ``{task: number of valid rows/positions}``, 0
      where the task had no targets or fell back), as
      :func:`compute_losses_with_diagnostics`.
    """
    # Host statistics (numpy float64) become jax arrays here, so the finalisation runs
    # the same f32 arithmetic as compute_losses (the accumulation was the part that
    # needed float64).
    stats = jax.tree_util.tree_map(jnp.asarray, stats)
    losses, n_valid = {}, {}
    for name, task_stats in stats.items():
        loss, count = _TASKS[name][2](task_stats, config)
        losses[name], n_valid[name] = jnp.asarray(loss, jnp.float32), jnp.asarray(count, jnp.float32)
    return losses, n_valid


def compute_losses_with_diagnostics(
    outputs: Mapping[str, Array],
    targets: Targets,
    config: LossConfig = LossConfig(),
    *,
    axis_name: Optional[str] = None,
) -> tuple[dict, LossDiagnostics]:
    """:func:`compute_losses` plus what it saw (NaN flag, valid counts per task)."""
    out, row, nan_in_outputs = _prepare(outputs, targets, axis_name)
    losses, n_valid = {}, {}
    for name in _scored_tasks(out):
        keys, statistics, finalize = _TASKS[name]

        def task_loss(o, statistics=statistics, finalize=finalize):
            return finalize(statistics(o, targets, row, config, axis_name), config)

        # Each task sees only the outputs it scores, behind the finite-gradient gate.
        loss, count = finite_or_zero_grad(task_loss)({k: out[k] for k in keys})
        losses[name], n_valid[name] = loss.astype(jnp.float32), count
    return losses, LossDiagnostics(nan_in_outputs=nan_in_outputs, n_valid=n_valid)


def compute_losses(
    outputs: Mapping[str, Array],
    targets: Targets,
    config: LossConfig = LossConfig(),
    *,
    axis_name: Optional[str] = None,
) -> dict:
    """Raw per-task losses of one batch, exactly as the original's ``_compute_losses``.

    Only the last month (``[:, -1]``) of the sequence outputs is scored. Each
    task has the original's three cases: valid targets, no valid rows in the
    batch (a tiny regulariser tied to the outputs, chosen with ``jnp.where``)
    and no targets at all (the field is ``None``; chosen at trace time).

    Computed as ``finalize_losses(loss_statistics(batch))`` task by task, so
    the losses of a whole split scored in pieces (see :func:`loss_statistics`)
    are those of this function on the split as one batch.

    Args:
      outputs: the model's output dict (``regime_logits [B,M,K]``,
        ``anomaly_score [B,M,1]``, ``casualty_pred [B,M,3]``,
        ``casualty_var [B,M,3]``, ``forecast_pred [B,M,Ff]`` and optionally
        ``daily_forecast_pred [B,H,·]``), any float dtype.
      targets: a :class:`~han_jax.batch.Targets` for the same B rows.
      config: loss options.
      axis_name: the ``pmap`` axis; batch statistics are then taken over all
        devices so that the result equals one device holding every row.

    Returns:
      ``{"regime", "transition", "casualty", "anomaly", "forecast"[,
      "daily_forecast"]}`` -> f32 scalars.
    """
    losses, _ = compute_losses_with_diagnostics(outputs, targets, config, axis_name=axis_name)
    return losses


def temporal_regularization(
    outputs: Mapping[str, Array],
    row: Optional[Array] = None,
    *,
    correlation_weight: float = 0.01,
    smoothness_weight: float = 0.001,
    target_roughness: float = 0.1,
    axis_name: Optional[str] = None,
) -> tuple[Array, dict]:
    """The original's ``TemporalRegularizer`` (train only, off by default).

    Penalises casualty predictions and regime probabilities that correlate
    positively with the month position, and casualty predictions that are
    smoother than ``target_roughness``. Stds are ``ddof=1`` as in torch.

    Note (faithful quirk): the regime term correlates the class-mean of the
    softmax, which is ``1/K`` at every month, so it is ~0 by construction.

    Args:
      outputs: model outputs with ``casualty_pred`` and ``regime_logits``.
      row: [B] bool, real rows (padding excluded); all rows when None.
      axis_name: the pmap axis, for means across devices.

    Returns:
      (penalty, {"casualty_corr", "casualty_smooth", "regime_corr"}).
    """
    breakdown = {}
    total = jnp.float32(0.0)

    def correlation(pred, rows):
        flat = pred.mean(axis=-1) if pred.ndim == 3 else pred  # [B, M]
        m = flat.shape[1]
        pos = jnp.arange(m, dtype=jnp.float32)
        pos = (pos - pos.mean()) / (jnp.std(pos, ddof=1) + 1e-8)
        mean = flat.mean(axis=-1, keepdims=True)
        std = jnp.std(flat, axis=-1, ddof=1, keepdims=True) + 1e-8
        corr = jnp.mean((flat - mean) / std * pos[None, :], axis=-1)
        value, _ = masked_mean(jax.nn.relu(corr), rows, axis_name=axis_name)
        return value

    if "casualty_pred" in outputs:
        pred = outputs["casualty_pred"].astype(jnp.float32)
        rows = jnp.ones(pred.shape[:1], bool) if row is None else row
        breakdown["casualty_corr"] = correlation(pred, rows)
        deltas = pred[:, 1:] - pred[:, :-1]
        roughness = jnp.mean(jnp.square(deltas), axis=1)  # [B, F]
        breakdown["casualty_smooth"], _ = masked_mean(
            jax.nn.relu(target_roughness - roughness), rows[:, None], axis_name=axis_name
        )
        total = total + correlation_weight * breakdown["casualty_corr"]
        total = total + smoothness_weight * breakdown["casualty_smooth"]
    if "regime_logits" in outputs:
        probs = jax.nn.softmax(outputs["regime_logits"].astype(jnp.float32), axis=-1)
        rows = jnp.ones(probs.shape[:1], bool) if row is None else row
        breakdown["regime_corr"] = correlation(probs, rows)
        total = total + correlation_weight * breakdown["regime_corr"]
    return total, breakdown
