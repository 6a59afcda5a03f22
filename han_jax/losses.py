"""Per-task losses of the multi-resolution HAN, ported exactly from the original.

Reference: ML-OSINT commit 75d6392, ``analysis/train_multi_resolution.py``
(``_compute_losses``, ``_compute_autoregressive_forecast_loss``,
``zinb_nll_loss``, ``interpret_casualty_outputs_as_zinb``,
``TemporalRegularizer``).

Layout, after ``optax/losses``: each loss is a small pure function returning
per-element values; reductions are left to the caller and all go through
:func:`masked_sum` / :func:`masked_mean` / :func:`masked_var`, which take
``axis_name``. Inside ``pmap`` those helpers ``psum`` sums and counts, so N
devices holding B/N rows each compute the same batch statistics (class counts,
means, variances) as one device holding all B rows: pmap correctness lives in
those three functions and nowhere else.

Where the original selects rows with ``mask.nonzero()`` and branches on
``mask.any()``/``.item()``, han-jax multiplies by masks and selects with
``jnp.where``; the unselected branch is always computed with safe
denominators so that neither its value nor its gradient can be NaN.

Deliberate differences from the original, all for the sake of parity between
phases and devices rather than of the numbers:
  * Padding rows (``Targets.sample_mask`` False) are excluded from every
    reduction, including the fallbacks, exactly as if the row were absent.
  * The "NaN in outputs" warning becomes a boolean diagnostic.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
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


def masked_sum(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> Array:
    """Sum of ``x`` where ``where`` holds, over all axes and (with ``axis_name``) all devices."""
    x = jnp.asarray(x, jnp.float32)
    if where is not None:
        x = jnp.where(jnp.broadcast_to(where, x.shape), x, 0.0)
    return _psum(jnp.sum(x), axis_name)


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


def masked_var(
    x: Array, where: Optional[Array] = None, *, ddof: int = 1, axis_name: Optional[str] = None
) -> tuple[Array, Array]:
    """Variance (``ddof=1`` like ``torch.var``) over the selected elements, and their count.

    Two passes (mean, then squared deviations) for accuracy. Where ``count <=
    ddof`` torch returns NaN; here the value is 0 and callers test the count.
    """
    mean, n = masked_mean(x, where, axis_name=axis_name)
    sq = jnp.square(jnp.asarray(x, jnp.float32) - mean)
    ss = masked_sum(sq, where, axis_name=axis_name)
    return ss / jnp.maximum(n - ddof, 1.0), n


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
    ``w[y_i]`` per row; the caller divides their (masked) sums.

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
# Task losses.
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


def _regime_loss(logits_seq, targets, row, config, axis_name):
    b, m, k = logits_seq.shape
    last = logits_seq[:, -1, :]
    last_fallback, _ = masked_mean(jnp.square(last), row[:, None], axis_name=axis_name)
    last_fallback = 1e-6 * last_fallback
    log_k = math.log(k)

    if targets.phase_index is None or targets.phase_valid is None:
        if m < 2:
            return last_fallback, jnp.float32(0.0)
        # No regime targets at all: the original's symmetric-KL temporal consistency.
        logp_t = jax.nn.log_softmax(logits_seq[:, 1:], axis=-1)
        logp_prev = jax.nn.log_softmax(logits_seq[:, :-1], axis=-1)
        p_t, p_prev = jnp.exp(logp_t), jnp.exp(logp_prev)
        # kl_div(input=log q, target=p) = sum p (log p - log q); xlogy makes p=0 terms 0.
        kl_fwd_row = jnp.sum(jax.scipy.special.xlogy(p_t, p_t) - p_t * logp_prev, axis=(1, 2))
        kl_bwd_row = jnp.sum(jax.scipy.special.xlogy(p_prev, p_prev) - p_prev * logp_t, axis=(1, 2))
        # reduction='batchmean' divides the total by the number of rows.
        kl_fwd, _ = masked_mean(kl_fwd_row, row, axis_name=axis_name)
        kl_bwd, _ = masked_mean(kl_bwd_row, row, axis_name=axis_name)
        ent = -jnp.sum(p_t * jnp.log(jnp.maximum(p_t, 1e-8)), axis=-1)  # [B, M-1]
        mean_ent, _ = masked_mean(ent, row[:, None], axis_name=axis_name)
        loss = 0.1 * (kl_fwd + kl_bwd) / 2 + 0.1 * jnp.abs(0.5 * log_k - mean_ent)
        return loss, jnp.float32(0.0)

    labels = regime_labels(targets.phase_index, k, config.phase_to_coarse)
    valid = row & targets.phase_valid.astype(bool)

    one_hot = jax.nn.one_hot(labels, k, dtype=jnp.float32) * valid[:, None]
    counts = _psum(jnp.sum(one_hot, axis=0), axis_name)
    class_weights = 1.0 / jnp.maximum(counts, 1.0)
    class_weights = class_weights / jnp.sum(class_weights) * k

    clamped = jnp.clip(last, -config.regime_logit_clamp, config.regime_logit_clamp)
    numerator, w_y = weighted_smoothed_cross_entropy(clamped, labels, class_weights, config.label_smoothing)
    num = masked_sum(numerator, valid, axis_name=axis_name)
    den = masked_sum(w_y, valid, axis_name=axis_name)
    ce = num / jnp.where(den > 0, den, 1.0)

    probs = jax.nn.softmax(clamped, axis=-1)
    mean_row_entropy, n_valid = masked_mean(entropy(probs), valid, axis_name=axis_name)
    mean_probs = _psum(jnp.sum(jnp.where(valid[:, None], probs, 0.0), axis=0), axis_name) / jnp.maximum(n_valid, 1.0)
    batch_diversity = entropy(mean_probs)
    entropy_penalty = jax.nn.relu(0.5 * log_k - mean_row_entropy)
    diversity_penalty = jax.nn.relu(0.7 * log_k - batch_diversity)

    # Floor first, then NaN -> 0: a NaN cross-entropy counts 0, not the floor.
    floored = jnp.maximum(ce, config.regime_loss_floor)
    floored = jnp.where(jnp.isnan(floored), 0.0, floored)
    loss = floored + config.regime_entropy_weight * entropy_penalty + config.regime_diversity_weight * diversity_penalty
    return jnp.where(n_valid > 0, loss, last_fallback), n_valid


def _transition_loss(score_last, targets, row, config, axis_name):
    fallback, _ = masked_mean(jnp.square(score_last), row, axis_name=axis_name)
    fallback = 1e-6 * fallback
    if targets.is_transition is None or targets.phase_valid is None:
        return fallback, jnp.float32(0.0)
    valid = row & targets.phase_valid.astype(bool)
    logits = jnp.clip(score_last, -50.0, 50.0)
    labels = targets.is_transition.astype(jnp.float32)
    if config.transition_focal:
        per_row = sigmoid_focal_loss(logits, labels, config.focal_alpha, config.focal_gamma)
    else:
        per_row = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
    loss, n_valid = masked_mean(per_row, valid, axis_name=axis_name)
    loss = jnp.where(jnp.isnan(loss), 0.0, loss)
    return jnp.where(n_valid > 0, loss, fallback), n_valid


def _casualty_loss(pred_last, var_last, targets, row, config, axis_name):
    pi_reg, _ = masked_mean(jnp.square(jax.nn.sigmoid(pred_last[:, 0]) - 0.5), row, axis_name=axis_name)
    log_mu_reg, _ = masked_mean(jnp.square(pred_last[:, 1]), row, axis_name=axis_name)
    log_mu_reg = 0.01 * log_mu_reg
    if targets.fatalities is None or targets.casualty_valid is None:
        return 0.01 * (pi_reg + log_mu_reg), jnp.float32(0.0)
    theta_reg, _ = masked_mean(jnp.square(jax.nn.softplus(var_last[:, 0]) - 1.0), row, axis_name=axis_name)
    fallback = 0.01 * (pi_reg + log_mu_reg + theta_reg)

    valid = row & targets.casualty_valid.astype(bool)
    # Monthly fatalities are O(1e3-1e4); the original scores them /1000.
    y = targets.fatalities.astype(jnp.float32) / config.casualty_target_scale
    y = jnp.where(valid, y, 1.0)  # keep lgamma of padding/invalid rows finite
    pi, mu, theta = zinb_parameters(pred_last, var_last)
    loss, n_valid = masked_mean(zinb_nll(y, pi, mu, theta), valid, axis_name=axis_name)
    return jnp.where(n_valid > 0, loss, fallback), n_valid


def _anomaly_loss(score_last, targets, row, axis_name):
    sq_mean, _ = masked_mean(jnp.square(score_last), row, axis_name=axis_name)
    if targets.anomaly is None or targets.anomaly_valid is None:
        return 0.01 * sq_mean, jnp.float32(0.0)
    valid = row & targets.anomaly_valid.astype(bool)
    pred = jnp.clip(score_last, -10.0, 10.0)
    target = jnp.where(valid, targets.anomaly.astype(jnp.float32), 0.0)
    mse, n_valid = masked_mean(jnp.square(pred - target), valid, axis_name=axis_name)
    mse = jnp.where(jnp.isnan(mse), 0.0, mse)
    var_pred, _ = masked_var(pred, valid, axis_name=axis_name)
    var_target, _ = masked_var(target, valid, axis_name=axis_name)
    # torch.var of one element is NaN and `NaN > 1e-6` is False: no penalty.
    use_penalty = (n_valid >= 2) & (var_target > 1e-6)
    penalty = jnp.where(use_penalty, jax.nn.relu(0.5 - var_pred / (var_target + 1e-6)), 0.0)
    loss = mse + 0.1 * penalty
    return jnp.where(n_valid > 0, loss, 1e-6 * sq_mean), n_valid


def _forecast_loss(pred, targets, row, axis_name):
    b, m, f_pred = pred.shape
    row3 = row[:, None, None]
    sq_mean, _ = masked_mean(jnp.square(pred), row3, axis_name=axis_name)
    tiny = 1e-6 * sq_mean
    if targets.forecast_targets is None or targets.forecast_masks is None:
        if m < 2:
            return tiny, jnp.float32(0.0)
        smooth, _ = masked_mean(jnp.square(pred[:, 1:] - pred[:, :-1]), row3, axis_name=axis_name)
        var_t = _per_row_var_over_months(pred)
        var_mean, _ = masked_mean(var_t, row[:, None], axis_name=axis_name)
        return 0.01 * smooth + 0.1 * jax.nn.relu(0.5 - var_mean), jnp.float32(0.0)

    k = min(f_pred, targets.forecast_targets.shape[-1])
    p = pred[..., :k]
    t = targets.forecast_targets[..., :k].astype(jnp.float32)
    valid = targets.forecast_masks[..., :k].astype(bool) & row3
    t = jnp.where(valid, t, 0.0)
    mse, n_valid = masked_mean(jnp.square(p - t), valid, axis_name=axis_name)
    var_pred, _ = masked_var(p, valid, axis_name=axis_name)
    var_target, _ = masked_var(t, valid, axis_name=axis_name)
    use_penalty = (n_valid >= 2) & (var_target > 1e-6)
    variance_penalty = jnp.where(use_penalty, 0.5 * jax.nn.relu(0.3 - var_pred / (var_target + 1e-6)), 0.0)
    if m >= 2:
        smooth, _ = masked_mean(jnp.square(p[:, 1:] - p[:, :-1]), row3, axis_name=axis_name)
        temporal_var, _ = masked_mean(_per_row_var_over_months(p), row[:, None], axis_name=axis_name)
        temporal_penalty = 0.1 * jax.nn.relu(0.1 - temporal_var)
        smooth = 0.01 * smooth
    else:
        smooth = temporal_penalty = jnp.float32(0.0)
    total = jnp.maximum(mse + smooth + variance_penalty + temporal_penalty, 0.01)
    return jnp.where(n_valid > 0, total, tiny), n_valid


def _per_row_var_over_months(x: Array) -> Array:
    """``x.var(dim=1)`` with ddof=1 per row and feature: [B, M, F] -> [B, F]."""
    mean = jnp.mean(x, axis=1, keepdims=True)
    return jnp.sum(jnp.square(x - mean), axis=1) / (x.shape[1] - 1)


def _daily_forecast_loss(pred, targets, row, config, axis_name):
    b, h, _ = pred.shape
    row3 = row[:, None, None]
    sq_mean, _ = masked_mean(jnp.square(pred), row3, axis_name=axis_name)
    if config.daily_forecast_latent:
        if h > 1:
            smooth, _ = masked_mean(jnp.square(pred[:, 1:] - pred[:, :-1]), row3, axis_name=axis_name)
            return smooth + 0.01 * sq_mean, jnp.float32(0.0)
        return 0.01 * sq_mean, jnp.float32(0.0)
    if targets.daily_forecast_targets is None:
        return 1e-6 * sq_mean, jnp.float32(0.0)
    t = targets.daily_forecast_targets.astype(jnp.float32)
    valid = t > -900.0
    if targets.daily_forecast_masks is not None:
        valid = valid & targets.daily_forecast_masks.astype(bool)
    valid = valid & row3
    k = min(pred.shape[-1], t.shape[-1])
    valid = valid[..., :k]
    mse, n_valid = masked_mean(jnp.square(pred[..., :k] - jnp.where(valid, t[..., :k], 0.0)), valid, axis_name=axis_name)
    return jnp.where(n_valid > 0, mse, 1e-6 * sq_mean), n_valid


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


def compute_losses_with_diagnostics(
    outputs: Mapping[str, Array],
    targets: Targets,
    config: LossConfig = LossConfig(),
    *,
    axis_name: Optional[str] = None,
) -> tuple[dict, LossDiagnostics]:
    """:func:`compute_losses` plus what it saw (NaN flag, valid counts per task)."""
    row = targets.sample_mask.astype(bool)
    out, nan_in_outputs = sanitize_outputs(outputs, row, axis_name)
    regime_logits = out["regime_logits"]
    chex.assert_rank(regime_logits, 3)
    chex.assert_shape(row, (regime_logits.shape[0],))

    def task(name, fn, keys):
        # Each task sees only the outputs it scores, behind the finite-gradient gate.
        loss, count = finite_or_zero_grad(fn)({k: out[k] for k in keys})
        losses[name], n_valid[name] = loss, count

    losses, n_valid = {}, {}
    task("regime", lambda o: _regime_loss(o["regime_logits"], targets, row, config, axis_name), ["regime_logits"])
    task("transition", lambda o: _transition_loss(o["anomaly_score"][:, -1, 0], targets, row, config, axis_name),
         ["anomaly_score"])
    task("casualty", lambda o: _casualty_loss(o["casualty_pred"][:, -1, :], o["casualty_var"][:, -1, :], targets,
                                              row, config, axis_name), ["casualty_pred", "casualty_var"])
    task("anomaly", lambda o: _anomaly_loss(o["anomaly_score"][:, -1, 0], targets, row, axis_name), ["anomaly_score"])
    task("forecast", lambda o: _forecast_loss(o["forecast_pred"], targets, row, axis_name), ["forecast_pred"])
    if "daily_forecast_pred" in out:
        task("daily_forecast", lambda o: _daily_forecast_loss(o["daily_forecast_pred"], targets, row, config, axis_name),
             ["daily_forecast_pred"])
    losses = {k: v.astype(jnp.float32) for k, v in losses.items()}
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
