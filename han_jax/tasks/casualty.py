"""Casualty: the fatalities of the anchor's month, as a zero-inflated negative binomial (ZINB) distribution.

The casualty head's last month gives the zero-inflation logit (``casualty_pred[..., 0]``),
log mu (``casualty_pred[..., 1]``) and the dispersion (``casualty_var[..., 0]``), read by
:func:`zinb_parameters` with the original's clamps. Loss: the ZINB negative log-likelihood of
the fatalities divided by ``casualty_target_scale`` (the original scores counts of O(1e3-1e4)
in thousands); without a valid row, small regularisers on the parameters. Metric: the mean
absolute error of the expected fatalities ``(1 - pi) mu scale``. Baseline: the training mean.

Proper scores of the predicted distribution (:mod:`han_jax.core.scores`), in fatalities: the
CRPS computed exactly from pi/mu/theta, the 90 % interval score and its coverage, the log
score (the model's own units, for the model alone: a point forecast has none), a randomised
PIT histogram; against zero, the training mean and, in a backtest, last month's total
("persistence") and the empirical distribution of the last 12 known months ("conflictology").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.core import scores
from han_jax.core.reductions import masked_count, masked_sum, ratio, sum_and_count
from han_jax.tasks.base import (
    Task,
    actual,
    as_array,
    held,
    host_mean,
    line_panel,
    mean_or_none,
    skill_score,
    valid_rows,
)

# The central interval scored: 90 %, as the VIEWS prediction challenge scores it.
INTERVAL_ALPHA = 0.1
# Months of history the conflictology baseline draws its empirical distribution from.
CONFLICTOLOGY_MONTHS = 12


def zinb_parameters(casualty_pred, casualty_var):
    """Reads the casualty head's last month as ZINB parameters (``interpret_casualty_outputs_as_zinb``).

    Args:
      casualty_pred: [B, 3]; channel 0 is the zero-inflation logit, channel 1 log mu.
      casualty_var: [B, 3]; channel 0 gives the dispersion theta.

    Returns:
      (pi, mu, theta), each [B]; mu in units of ``casualty_target_scale`` fatalities.
    """
    # Clamps bound sigmoid saturation and exp overflow (exp(12) ~ 1.6e5).
    pi = jax.nn.sigmoid(jnp.clip(casualty_pred[:, 0], -10.0, 10.0))
    mu = jnp.exp(jnp.clip(casualty_pred[:, 1], -5.0, 12.0))
    theta = jnp.clip(jax.nn.softplus(casualty_var[:, 0]), 0.1, 100.0)
    return pi, mu, theta


def expected_fatalities(pi, mu, scale: float):
    """The ZINB mean in fatalities: ``(1 - pi) mu scale`` (the metric and the prediction both read this)."""
    return (1.0 - pi) * mu * scale


def zinb_nll(y, pi, mu, theta, eps: float = 1e-8, max_loss: float = 20.0):
    """Per-row zero-inflated negative binomial negative log-likelihood.

    ``P(0) = pi + (1-pi) NB(0)``, ``P(k) = (1-pi) NB(k)`` with mean ``mu`` and dispersion
    ``theta`` (variance ``mu + mu^2/theta``).

    Args:
      y: [B] non-negative targets (scaled counts, need not be integers).
      pi, mu, theta: [B] ZINB parameters.
      eps: clamp of pi to [eps, 1-eps] and of mu, theta from below.
      max_loss: per-row NLL is clamped to [0, max_loss]; NaN becomes max_loss.

    Returns:
      [B] NLL values.

    References:
      Original ``zinb_nll_loss``; ZINB as in the VIEWS conflict-forecasting methodology.
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


class CasualtyTask(Task):
    name = "casualty"
    headline_score = "crps"
    backtest_rows = "month_once"  # one total a month: every day of the month has the same outcome
    outputs = ("casualty_pred", "casualty_var")
    prior = 1.4
    metric_counts = {"casualty_mae": "n/casualty"}
    table_rows = ("casualty_mae", "baseline/casualty_mae")

    def statistics(self, outputs, targets, row, config, axis_name):
        pred_last, var_last = outputs["casualty_pred"][:, -1, :], outputs["casualty_var"][:, -1, :]
        stats = {
            "pi_reg_sum": masked_sum(jnp.square(jax.nn.sigmoid(pred_last[:, 0]) - 0.5), row, axis_name=axis_name),
            "log_mu_sq_sum": masked_sum(jnp.square(pred_last[:, 1]), row, axis_name=axis_name),
            "n_rows": masked_count(pred_last[:, 0], row, axis_name=axis_name),
        }
        if targets.fatalities is None or targets.casualty_valid is None:
            return stats
        stats["theta_reg_sum"] = masked_sum(jnp.square(jax.nn.softplus(var_last[:, 0]) - 1.0), row,
                                            axis_name=axis_name)
        valid = row & targets.casualty_valid.astype(bool)
        y = targets.fatalities.astype(jnp.float32) / config.casualty_target_scale
        y = jnp.where(valid, y, 1.0)  # keeps lgamma of padding and invalid rows finite
        pi, mu, theta = zinb_parameters(pred_last, var_last)
        stats["nll_sum"], stats["n_valid"] = sum_and_count(zinb_nll(y, pi, mu, theta), valid, axis_name=axis_name)
        error = jnp.abs(expected_fatalities(pi, mu, config.casualty_target_scale)
                        - jnp.where(valid, targets.fatalities, 0.0))
        stats["abs_error_sum"] = masked_sum(error, valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        pi_reg = ratio(s["pi_reg_sum"], s["n_rows"])
        log_mu_reg = 0.01 * ratio(s["log_mu_sq_sum"], s["n_rows"])
        if "nll_sum" not in s:
            return 0.01 * (pi_reg + log_mu_reg), jnp.float32(0.0)
        theta_reg = ratio(s["theta_reg_sum"], s["n_rows"])
        fallback = 0.01 * (pi_reg + log_mu_reg + theta_reg)
        n_valid = s["n_valid"]
        return jnp.where(n_valid > 0, ratio(s["nll_sum"], n_valid), fallback), n_valid

    def metrics(self, s, model):
        if "nll_sum" not in s:
            zero = 0.0 * s["n_rows"]
            return {"casualty_mae": zero, "n/casualty": zero}
        return {"casualty_mae": ratio(s["abs_error_sum"], s["n_valid"]), "n/casualty": s["n_valid"]}

    # -- baseline: the training mean -----------------------------------------------------------------

    def fit_baseline(self, train, model, loss):
        """The mean fatalities of the valid train rows (the data's units); None without a valid row."""
        valid = valid_rows(train, train.casualty_valid)
        if valid is None or train.fatalities is None:
            return None
        return host_mean(as_array(train.fatalities, np.float64), valid)

    def baseline_metrics(self, mean, targets, model, loss):
        valid = valid_rows(targets, targets.casualty_valid)
        if mean is None or valid is None or targets.fatalities is None:
            return {"baseline/casualty_mae": None}
        return {"baseline/casualty_mae": host_mean(np.abs(mean - as_array(targets.fatalities, np.float64)), valid)}

    def skill(self, metrics):
        return {"skill/casualty": skill_score(metrics.get("casualty_mae"), [metrics.get("baseline/casualty_mae")])}

    # -- proper scores ---------------------------------------------------------------------------

    def baseline_forecasts(self, train, targets, known, ctx):
        out = {"zero": {"point": np.zeros(1)}}
        mean = self.fit_baseline(train, ctx.model, ctx.loss)
        if mean is not None:
            out["train_mean"] = {"point": np.asarray([mean])}
        if known is not None and len(known.fatalities):
            out["persistence"] = {"point": np.asarray(known.fatalities[-1:], np.float64)}
            out["conflictology"] = {"samples": np.asarray(known.fatalities[-CONFLICTOLOGY_MONTHS:], np.float64)}
        return out

    def proper_scores(self, forecast, targets, ctx):
        valid = valid_rows(targets, targets.casualty_valid)
        if valid is None or targets.fatalities is None or not valid.any():
            return {"crps": None, "log_score": None, "interval_score_90": None, "coverage_90": None, "mae": None}
        y = as_array(targets.fatalities, np.float64)[valid]
        n, scale = len(valid), ctx.loss.casualty_target_scale
        log_score = None
        if "zinb_mu" in forecast:
            pi, mu, theta = (held(forecast[k], n)[valid] for k in ("zinb_pi", "zinb_mu", "zinb_theta"))
            # The distribution is over counts of `scale` fatalities; every score but the log score is in fatalities.
            crps = scale * scores.zinb_crps(y / scale, pi, mu, theta)
            lower = scale * scores.zinb_quantile(INTERVAL_ALPHA / 2, pi, mu, theta)
            upper = scale * scores.zinb_quantile(1 - INTERVAL_ALPHA / 2, pi, mu, theta)
            mean = expected_fatalities(pi, mu, scale)
            log_score = mean_or_none(scores.zinb_log_score(y / scale, pi, mu, theta))
        elif "samples" in forecast:
            samples = np.broadcast_to(np.asarray(forecast["samples"], np.float64), (len(y), len(forecast["samples"])))
            crps = scores.empirical_crps(samples, y)
            lower = scores.empirical_quantile(samples, INTERVAL_ALPHA / 2)
            upper = scores.empirical_quantile(samples, 1 - INTERVAL_ALPHA / 2)
            mean = samples.mean(axis=1)
        else:  # a point forecast: a distribution with all its mass on one value
            mean = held(forecast["point"], n)[valid]
            crps, lower, upper = np.abs(mean - y), mean, mean
        return {"crps": mean_or_none(crps), "log_score": log_score,
                "interval_score_90": mean_or_none(scores.interval_score(lower, upper, y, INTERVAL_ALPHA)),
                "coverage_90": mean_or_none((lower <= y) & (y <= upper)), "mae": mean_or_none(np.abs(mean - y))}

    def calibration(self, forecast, targets, ctx):
        valid = valid_rows(targets, targets.casualty_valid)
        if "zinb_mu" not in forecast or valid is None or targets.fatalities is None or not valid.any():
            return {}
        n, scale = len(valid), ctx.loss.casualty_target_scale
        pi, mu, theta = (held(forecast[k], n)[valid] for k in ("zinb_pi", "zinb_mu", "zinb_theta"))
        y = as_array(targets.fatalities, np.float64)[valid] / scale
        # A fixed draw: the same forecasts give the same histogram in every report.
        return {"pit": scores.randomized_pit(y, pi, mu, theta, np.random.default_rng(0))}

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, outputs, model, loss):
        pi, mu, theta = zinb_parameters(outputs["casualty_pred"][:, -1].astype(jnp.float32),
                                        outputs["casualty_var"][:, -1].astype(jnp.float32))
        return {"zinb_pi": pi, "zinb_mu": mu, "zinb_theta": theta,
                "expected_fatalities": expected_fatalities(pi, mu, loss.casualty_target_scale)}

    def columns(self, predictions, targets, ctx):
        cols = {k: np.asarray(predictions[k], np.float64)
                for k in ("expected_fatalities", "zinb_pi", "zinb_mu", "zinb_theta")}
        cols["actual/fatalities"] = actual(targets["fatalities"], targets["casualty_valid"])
        return cols

    def describe(self, columns, i):
        return (f"expected fatalities {columns['expected_fatalities'][i]:.1f} (pi {columns['zinb_pi'][i]:.3f}, "
                f"mu {columns['zinb_mu'][i]:.4g}, theta {columns['zinb_theta'][i]:.4g})"), []

    def panels(self, columns):
        return [line_panel("expected_fatalities", "actual/fatalities", "fatalities of the anchor's month")]


CASUALTY = CasualtyTask()
