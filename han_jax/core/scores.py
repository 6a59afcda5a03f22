"""Proper scoring rules for the regime, transition and casualty heads and their baselines, computed on the host
from per-row predictions: log score, Brier score and calibration for the categorical regime head, log score,
Brier score and average precision for the binary transition head, and log score, CRPS, quantiles, interval
score and randomized PIT for the zero-inflated negative binomial (ZINB) casualty head, plus the sample-based
CRPS and quantile for baselines that forecast by samples. Everything is float64 numpy/scipy; each function
returns one value per row and leaves the reduction to the caller unless its docstring says otherwise.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import special, stats

# Probabilities are floored before a log so that a certain wrong forecast scores -log(1e-7) ~= 16.1 instead of
# inf; the model and the baselines use the same floor, so their scores stay comparable.
PROB_FLOOR = 1e-7

# zinb_crps walks each row's integer grid 0..K in blocks of this many points, so memory stays bounded whatever K.
CRPS_BLOCK = 2**20
# The largest grid zinb_crps accepts for one row. Under the callers' clamps (mu <= exp(12), theta >= 0.1,
# pi >= sigmoid(-10)) and tail=1e-10 the grid reaches K ~= 2.95e7 (> 2**24) for theta = 0.1, mu = exp(12);
# 2**26 ~= 6.7e7 leaves a factor of two over that and bounds the time of one row (about 0.5 us per grid point).
CRPS_MAX_GRID = 2**26


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# Categorical (regime head)
# --------------------------------------------------------------------------------------------------------------


def categorical_log_score(probs, labels) -> np.ndarray:
    """Negative log probability of the observed class.

    Args:
      probs: ``[N, K]`` predicted class probabilities.
      labels: int ``[N]`` observed classes.

    Returns:
      ``[N]``: ``-log(max(probs[n, labels[n]], PROB_FLOOR))``.

    References:
      Good (1952), "Rational decisions", JRSS B 14(1). Gneiting & Raftery (2007), JASA 102(477), section 3.
    """
    probs = _f64(probs)
    labels = np.asarray(labels, dtype=np.intp)
    p = np.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    # Floored so a zero probability on the observed class is a large finite penalty, not inf.
    return -np.log(np.maximum(p, PROB_FLOOR))


def categorical_brier(probs, labels) -> np.ndarray:
    """Multi-class Brier score.

    Args:
      probs: ``[N, K]`` predicted class probabilities.
      labels: int ``[N]`` observed classes.

    Returns:
      ``[N]``: ``sum_c (probs[n, c] - 1{c == labels[n]})^2``, in ``[0, 2]``.

    References:
      Brier (1950), Monthly Weather Review 78(1). Gneiting & Raftery (2007), JASA 102(477), section 3.
    """
    probs = _f64(probs)
    labels = np.asarray(labels, dtype=np.intp)
    onehot = np.arange(probs.shape[1])[None, :] == labels[:, None]
    return np.sum((probs - onehot) ** 2, axis=1)


def reliability(confidence, outcome, n_bins: int = 10) -> dict:
    """Reliability-diagram statistics over equal-width bins of the predicted probability.

    Bin ``b`` is ``[edges[b], edges[b+1])`` with ``edges[b] = b / n_bins``; a confidence of exactly 1.0 goes in
    the last bin.

    Args:
      confidence: ``[N]`` predicted probabilities in ``[0, 1]``.
      outcome: ``[N]`` outcomes (0/1 or bool; any real value is averaged as given).
      n_bins: number of bins.

    Returns:
      ``{"count": int [n_bins], "confidence": float [n_bins], "frequency": float [n_bins], "edges": [n_bins+1]}``:
      rows per bin, mean confidence per bin and mean outcome per bin (both NaN for an empty bin), and the edges.

    References:
      Murphy & Winkler (1977), "Reliability of subjective probability forecasts", JRSS C 26(1).
    """
    confidence = _f64(confidence).reshape(-1)
    outcome = _f64(outcome).reshape(-1)
    # b / n_bins, correctly rounded, so a confidence of 0.7 (the double nearest 7/10) starts bin 7; linspace's
    # 7 * 0.1 = 0.7000000000000001 would put it in bin 6.
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    # Binned against the same edges that are returned (not floor(conf * n_bins), whose rounding can disagree
    # with them at a boundary); clipped so 1.0 (and any value just outside [0, 1]) lands in an end bin.
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=confidence, minlength=n_bins)
    sum_out = np.bincount(idx, weights=outcome, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        mean_out = np.where(count > 0, sum_out / count, np.nan)
    return {"count": count, "confidence": mean_conf, "frequency": mean_out, "edges": edges}


def expected_calibration_error(probs, labels, n_bins: int = 10) -> Optional[float]:
    """Top-label expected calibration error (a reduction over rows, not a per-row score).

    Confidence is the largest predicted probability, a row is correct when its argmax is the label; rows are
    binned as in :func:`reliability`.

    Args:
      probs: ``[N, K]`` predicted class probabilities.
      labels: int ``[N]`` observed classes.
      n_bins: number of equal-width bins on ``[0, 1]``.

    Returns:
      ``sum_b (n_b / N) |acc_b - conf_b|`` over non-empty bins, or None when ``N == 0``.

    References:
      Naeini, Cooper & Hauskrecht (2015), AAAI. Guo, Pleiss, Sun & Weinberger (2017), ICML.
    """
    probs = _f64(probs)
    labels = np.asarray(labels, dtype=np.intp).reshape(-1)
    n = labels.shape[0]
    if n == 0:
        return None
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    rel = reliability(confidence, correct, n_bins)
    nonempty = rel["count"] > 0
    gap = np.abs(rel["frequency"][nonempty] - rel["confidence"][nonempty])
    return float(np.sum(rel["count"][nonempty] / n * gap))


# --------------------------------------------------------------------------------------------------------------
# Binary (transition head)
# --------------------------------------------------------------------------------------------------------------


def binary_log_score(p, y) -> np.ndarray:
    """Negative Bernoulli log-likelihood.

    Args:
      p: ``[N]`` predicted probabilities of the event.
      y: ``[N]`` outcomes, 0/1 or bool.

    Returns:
      ``[N]``: ``-(y log max(p, F) + (1 - y) log max(1 - p, F))`` with ``F = PROB_FLOOR``.

    References:
      Good (1952), JRSS B 14(1). Gneiting & Raftery (2007), JASA 102(477), section 3.
    """
    p, y = _f64(p), _f64(y)
    # Both sides floored so a certain wrong forecast is finite; 1 - p is formed directly (p is a probability,
    # so its complement is exact to one rounding).
    return -(y * np.log(np.maximum(p, PROB_FLOOR)) + (1.0 - y) * np.log(np.maximum(1.0 - p, PROB_FLOOR)))


def binary_brier(p, y) -> np.ndarray:
    """Binary Brier score.

    Args:
      p: ``[N]`` predicted probabilities of the event.
      y: ``[N]`` outcomes, 0/1 or bool.

    Returns:
      ``[N]``: ``(p - y)^2``.

    References:
      Brier (1950), Monthly Weather Review 78(1).
    """
    return (_f64(p) - _f64(y)) ** 2


def average_precision(p, y) -> Optional[float]:
    """Average precision, as scikit-learn's ``average_precision_score`` (a reduction over rows).

    Args:
      p: ``[N]`` scores (higher = more likely positive).
      y: ``[N]`` outcomes, 0/1 or bool.

    Returns:
      ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds in decreasing order (tied scores form one
      threshold; ``R_0 = 0``), or None when ``y`` has no positive.

    References:
      Zhu (2004), "Recall, precision and average precision", University of Waterloo.
      scikit-learn ``sklearn.metrics.average_precision_score``.
    """
    p = _f64(p).reshape(-1)
    y = _f64(y).reshape(-1)
    if not np.any(y > 0):
        return None
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # The last index of each run of tied scores: a threshold admits all of its ties at once.
    last = np.r_[np.flatnonzero(np.diff(p_sorted) != 0), p_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    predicted = last + 1.0
    precision = tps / predicted
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


# --------------------------------------------------------------------------------------------------------------
# Zero-inflated negative binomial (casualty head)
# --------------------------------------------------------------------------------------------------------------


def _nb_p(mu, theta):
    # scipy's nbinom(n, p) counts failures before the n-th success: mean n (1-p)/p, so p = theta / (theta + mu)
    # gives mean mu and variance mu + mu^2 / theta.
    return theta / (theta + mu)


def zinb_cdf(k, pi, mu, theta) -> np.ndarray:
    """CDF of the zero-inflated negative binomial.

    Args:
      k: integer-valued evaluation points (a non-integer is floored, as a step CDF).
      pi: zero-inflation probability.
      mu: mean of the negative binomial component.
      theta: its dispersion (variance ``mu + mu^2 / theta``).

    Returns:
      ``F(k) = pi + (1 - pi) NB(k; mu, theta)`` for ``k >= 0`` and 0 for ``k < 0``, broadcast over the inputs.

    References:
      Lambert (1992), "Zero-inflated Poisson regression", Technometrics 34(1). Hilbe (2011), "Negative
      Binomial Regression", 2nd ed.
    """
    k, pi, mu, theta = np.broadcast_arrays(_f64(k), _f64(pi), _f64(mu), _f64(theta))
    g = stats.nbinom.cdf(k, theta, _nb_p(mu, theta))
    return np.where(k < 0, 0.0, pi + (1.0 - pi) * g)


def _zinb_sf(k, pi, mu, theta):
    # 1 - F(k) for k >= 0 from the negative binomial's own survival function, so a tail probability far below
    # machine epsilon keeps its relative accuracy (1 - cdf would cancel to 0).
    return (1.0 - pi) * stats.nbinom.sf(k, theta, _nb_p(mu, theta))


def zinb_log_score(y, pi, mu, theta) -> np.ndarray:
    """Negative log-likelihood of the zero-inflated negative binomial.

    The negative binomial pmf is written through ``gammaln``, so a non-integer ``y`` scores with its continuous
    extension; nothing is clamped (a zero-probability outcome scores inf).

    Args:
      y: ``[N]`` observations, ``y >= 0``.
      pi: zero-inflation probability.
      mu: mean of the negative binomial component.
      theta: its dispersion.

    Returns:
      ``[N]``: ``-log P(y)`` with ``P(0) = pi + (1 - pi) NB(0)`` and ``P(y > 0) = (1 - pi) NB(y)``.

    References:
      Lambert (1992), Technometrics 34(1). Gneiting & Raftery (2007), JASA 102(477), section 3.
    """
    y, pi, mu, theta = np.broadcast_arrays(_f64(y), _f64(pi), _f64(mu), _f64(theta))
    with np.errstate(divide="ignore", invalid="ignore"):
        # theta log(theta / (theta + mu)) as -theta log1p(mu / theta): no cancellation when mu << theta.
        log_nb0 = -theta * np.log1p(mu / theta)
        log_nb = (
            special.gammaln(y + theta)
            - special.gammaln(theta)
            - special.gammaln(y + 1.0)
            + log_nb0
            + y * (np.log(mu) - np.log(theta + mu))
        )
        # log1p(-pi) keeps log(1 - pi) accurate for a small pi.
        log_1m_pi = np.log1p(-pi)
        # log(pi + (1 - pi) NB(0)) without leaving log space: exact for pi -> 0 and for NB(0) -> 0.
        log_p0 = np.logaddexp(np.log(pi), log_1m_pi + log_nb0)
        return -np.where(y == 0, log_p0, log_1m_pi + log_nb)


def zinb_crps(y, pi, mu, theta, tail: float = 1e-10) -> np.ndarray:
    """Continuous ranked probability score of the zero-inflated negative binomial, by summing its step CDF.

    ``CRPS(F, y) = int (F(x) - 1{x >= y})^2 dx``. F is constant on each ``[k, k+1)``, so the integral is a sum
    over ``k = 0, 1, ...`` of ``F(k)^2`` where ``k + 1 <= y``, ``(1 - F(k))^2`` where ``k >= y``, and
    ``(y - k) F(k)^2 + (k + 1 - y)(1 - F(k))^2`` on the interval containing a non-integer ``y``. Each row's sum
    runs over its grid ``0..K`` with ``K`` the first integer ``>= max(y, k*)`` and ``k*`` the smallest integer
    with ``1 - F(k*) <= tail``. The neglected terms are ``sum_{k > K} (1 - F(k))^2 <= (1 - F(K)) sum_{k > K}
    (1 - F(k)) <= tail * E[(X - K)^+]``: ``tail`` times a tail expectation that is itself of order ``tail``,
    negligible against the score for the default. The grid is walked in blocks of ``CRPS_BLOCK`` points, so
    memory is bounded for any K; time is linear in the total grid (about 0.5 us per point: the worst row the
    callers' clamps allow, K ~= 2.95e7, takes about 18 s).

    Args:
      y: ``[N]`` observations, real and ``>= 0`` (a negative y is scored exactly too: it adds ``-y``).
      pi: zero-inflation probability.
      mu: mean of the negative binomial component.
      theta: its dispersion.
      tail: the survival probability beyond which the sum is cut.

    Returns:
      ``[N]`` CRPS values, ``>= 0``.

    Raises:
      ValueError: a row's grid is not finite or exceeds ``CRPS_MAX_GRID`` (the message names its parameters).

    References:
      Matheson & Winkler (1976), Management Science 22(10). Gneiting & Raftery (2007), JASA 102(477),
      section 4.2. Wei & Held (2014), "Calibration tests for count data", TEST 23(4).
    """
    y, pi, mu, theta = np.broadcast_arrays(_f64(y), _f64(pi), _f64(mu), _f64(theta))
    out_shape = y.shape
    y, pi, mu, theta = (a.reshape(-1) for a in (y, pi, mu, theta))
    n = y.shape[0]
    if n == 0:
        return np.zeros(out_shape)
    p = _nb_p(mu, theta)

    # k*: 1 - F(k) = (1 - pi) S_NB(k) <= tail  <=>  S_NB(k) <= tail / (1 - pi); nbinom.isf returns the smallest
    # such k. A row whose zero mass alone leaves less than `tail` (r >= 1) needs no tail at all.
    with np.errstate(divide="ignore", invalid="ignore"):
        r = tail / (1.0 - pi)
        k_star = np.where(r >= 1.0, 0.0, stats.nbinom.isf(np.minimum(r, 1.0), theta, p))
    # A degenerate negative binomial (mu = 0) has no tail: isf may answer NaN or -1 there.
    k_star = np.where((mu == 0) & np.isfinite(theta), 0.0, k_star)
    grid_end = np.maximum(np.ceil(y), k_star)
    bad = ~np.isfinite(grid_end) | (grid_end < 0) | (grid_end > CRPS_MAX_GRID)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"zinb_crps: row {i} (y={float(y[i])!r}, pi={float(pi[i])!r}, mu={float(mu[i])!r}, "
            f"theta={float(theta[i])!r}, tail={tail!r}) needs a grid of K={float(grid_end[i])!r} points; "
            f"at most {CRPS_MAX_GRID} are accepted"
        )
    # isf's own root-finding can land one step early; step forward where the bound does not yet hold so the
    # documented tail bound is guaranteed (a few iterations at most).
    for _ in range(8):
        short = _zinb_sf(grid_end, pi, mu, theta) > tail
        if not np.any(short):
            break
        grid_end = np.where(short, grid_end + 1.0, grid_end)

    lengths = grid_end.astype(np.int64) + 1  # grid 0..K inclusive
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    crps = np.zeros(n)
    # The flattened ragged grid of every row, walked in fixed-size blocks: a long row spans several blocks, many
    # short rows share one. Memory is a few arrays of CRPS_BLOCK float64 whatever K is.
    for a in range(0, total, CRPS_BLOCK):
        pos = np.arange(a, min(a + CRPS_BLOCK, total), dtype=np.int64)
        row = np.searchsorted(ends, pos, side="right")
        k = (pos - starts[row]).astype(np.float64)
        yr, pir, mur, thr = y[row], pi[row], mu[row], theta[row]
        below = k + 1.0 <= yr  # [k, k+1) entirely left of y: F^2
        above = k >= yr  # entirely right of y: (1 - F)^2
        split = ~(below | above)  # contains a non-integer y
        contrib = np.zeros(pos.shape[0])
        # F from the cdf where F^2 is needed and 1 - F from the survival function where (1 - F)^2 is needed,
        # each the accurate side; only the split interval needs both. One special-function call per point.
        need_f = below | split
        need_s = above | split
        f = np.zeros(pos.shape[0])
        s = np.zeros(pos.shape[0])
        f[need_f] = zinb_cdf(k[need_f], pir[need_f], mur[need_f], thr[need_f])
        s[need_s] = _zinb_sf(k[need_s], pir[need_s], mur[need_s], thr[need_s])
        contrib[below] = f[below] ** 2
        contrib[above] = s[above] ** 2
        frac = yr[split] - k[split]
        contrib[split] = frac * f[split] ** 2 + (1.0 - frac) * s[split] ** 2
        # bincount adds each row's terms in grid order; all terms are >= 0, so the sum has no cancellation.
        crps += np.bincount(row, weights=contrib, minlength=n)
    # A negative y (outside the documented domain, but exact for free): F = 0 and the indicator is 1 on [y, 0).
    crps += np.maximum(-y, 0.0)
    return crps.reshape(out_shape)


def zinb_quantile(q, pi, mu, theta) -> np.ndarray:
    """Quantile function of the zero-inflated negative binomial.

    Args:
      q: probability levels in ``(0, 1)``.
      pi: zero-inflation probability.
      mu: mean of the negative binomial component.
      theta: its dispersion.

    Returns:
      The smallest integer ``k >= 0`` with ``F(k) >= q`` (float array), broadcast over the inputs.

    References:
      Lambert (1992), Technometrics 34(1).
    """
    q, pi, mu, theta = np.broadcast_arrays(_f64(q), _f64(pi), _f64(mu), _f64(theta))
    # F(k) >= q  <=>  NB(k) >= (q - pi) / (1 - pi), and nbinom.ppf(r) is the smallest k with NB(k) >= r. Below
    # F(0) the answer is 0 (this also covers pi = 1, where the ratio would divide by zero).
    at_zero = q <= zinb_cdf(0.0, pi, mu, theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(at_zero, 0.5, (q - pi) / np.where(at_zero, 1.0, 1.0 - pi))
        k = np.where(at_zero, 0.0, stats.nbinom.ppf(np.clip(r, 0.0, 1.0), theta, _nb_p(mu, theta)))
    # The ratio is rounded, so ppf can be one step off the definition in terms of zinb_cdf itself; one step each
    # way makes the result agree with zinb_cdf exactly.
    k = np.where((k > 0) & (zinb_cdf(k - 1.0, pi, mu, theta) >= q), k - 1.0, k)
    k = np.where(zinb_cdf(k, pi, mu, theta) < q, k + 1.0, k)
    return k


def interval_score(lower, upper, y, alpha) -> np.ndarray:
    """Interval score of a central ``(1 - alpha)`` prediction interval.

    Args:
      lower: ``[N]`` lower ends.
      upper: ``[N]`` upper ends.
      y: ``[N]`` observations.
      alpha: the interval's nominal miss rate (e.g. 0.1 for a 90% interval).

    Returns:
      ``[N]``: ``(u - l) + (2 / alpha)(l - y) 1{y < l} + (2 / alpha)(y - u) 1{y > u}``.

    References:
      Gneiting & Raftery (2007), JASA 102(477), section 6.2.
    """
    lower, upper, y, alpha = _f64(lower), _f64(upper), _f64(y), _f64(alpha)
    return (upper - lower) + (2.0 / alpha) * np.maximum(lower - y, 0.0) + (2.0 / alpha) * np.maximum(y - upper, 0.0)


def randomized_pit(y, pi, mu, theta, rng: np.random.Generator) -> np.ndarray:
    """Randomized probability integral transform of a count observation under the ZINB.

    Under a calibrated forecast the values are uniform on ``[0, 1]``.

    Args:
      y: ``[N]`` observations, ``>= 0``.
      pi: zero-inflation probability.
      mu: mean of the negative binomial component.
      theta: its dispersion.
      rng: the numpy Generator that draws ``V ~ U(0, 1)`` (one per row, always drawn).

    Returns:
      ``[N]``: ``F(y-) + V (F(y) - F(y-))`` with ``F(y-) = F(ceil(y) - 1)``; for a non-integer ``y`` the CDF is
      flat there and the value is ``F(floor(y))`` exactly.

    References:
      Czado, Gneiting & Held (2009), "Predictive model assessment for count data", Biometrics 65(4).
    """
    y, pi, mu, theta = np.broadcast_arrays(_f64(y), _f64(pi), _f64(mu), _f64(theta))
    # F(ceil(y) - 1) and F(floor(y)) are the two ends of the jump at an integer y and the same number for a
    # non-integer y, so one formula serves both and the latter gets F(floor(y)) + V * 0 exactly.
    f_lo = zinb_cdf(np.ceil(y) - 1.0, pi, mu, theta)
    f_hi = zinb_cdf(np.floor(y), pi, mu, theta)
    v = rng.uniform(size=y.shape)
    return f_lo + v * (f_hi - f_lo)


# --------------------------------------------------------------------------------------------------------------
# Sample-based forecasts (baselines)
# --------------------------------------------------------------------------------------------------------------


def _rows_and_mask(samples, where):
    samples = np.atleast_2d(_f64(samples))
    if where is None:
        mask = np.ones(samples.shape, dtype=bool)
    else:
        mask = np.atleast_2d(np.asarray(where, dtype=bool))
    return samples, mask


def empirical_crps(samples, y, where=None) -> np.ndarray:
    """CRPS of each row's empirical distribution of samples.

    Args:
      samples: ``[N, S]`` samples, or ``[S]`` shared by every row.
      y: ``[N]`` observations.
      where: optional bool ``[N, S]`` or ``[S]``: which samples count.

    Returns:
      ``[N]``: ``mean|X - y| - 0.5 mean|X - X'|`` over the row's selected samples (X, X' independent draws
      from them, so the exact CRPS of the step CDF); NaN for a row with no sample.

    References:
      Gneiting & Raftery (2007), JASA 102(477), eq. (21). Hersbach (2000), Weather and Forecasting 15(5).
    """
    y = np.atleast_1d(_f64(y))
    samples, mask = _rows_and_mask(samples, where)
    n = y.shape[0]
    samples = np.broadcast_to(samples, (n, samples.shape[-1]))
    mask = np.broadcast_to(mask, samples.shape)
    m = mask.sum(axis=1).astype(np.float64)
    # Unselected samples sort to the end (+inf) and are then zeroed, so the first m sorted entries of a row are
    # its selected samples in order.
    order = np.argsort(np.where(mask, samples, np.inf), axis=1, kind="stable")
    xs = np.take_along_axis(samples, order, axis=1)
    ms = np.take_along_axis(mask, order, axis=1)
    xs = np.where(ms, xs, 0.0)
    # mean|X - X'| = (2 / m^2) sum_i (2i - m - 1) x_(i) over the sorted x_(1..m): O(S log S) rather than the
    # O(S^2) double sum.
    i = np.arange(1, samples.shape[1] + 1, dtype=np.float64)[None, :]
    weights = np.where(ms, 2.0 * i - m[:, None] - 1.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        term_y = np.sum(np.where(mask, np.abs(samples - y[:, None]), 0.0), axis=1) / m
        spread = np.sum(weights * xs, axis=1) / m**2  # = 0.5 mean|X - X'|
        return np.where(m > 0, term_y - spread, np.nan)


def empirical_quantile(samples, q, where=None) -> np.ndarray:
    """Inverted-CDF quantile of each row's selected samples.

    Args:
      samples: ``[N, S]`` samples, or ``[S]`` shared by every row.
      q: probability level in ``[0, 1]`` (a scalar, or ``[N]``).
      where: optional bool ``[N, S]`` or ``[S]``: which samples count.

    Returns:
      ``[N]``: as ``np.quantile(row[where_row], q, method="inverted_cdf")``; NaN for a row with no sample.

    References:
      Hyndman & Fan (1996), "Sample quantiles in statistical packages", The American Statistician 50(4),
      definition 1.
    """
    samples, mask = _rows_and_mask(samples, where)
    q = _f64(q)
    n = max(samples.shape[0], mask.shape[0], q.shape[0] if q.ndim else 1)
    samples = np.broadcast_to(samples, (n, samples.shape[-1]))
    mask = np.broadcast_to(mask, samples.shape)
    q = np.broadcast_to(q, (n,))
    m = mask.sum(axis=1)
    xs = np.sort(np.where(mask, samples, np.inf), axis=1)
    # numpy's own inverted_cdf index, with the same floating-point steps so the result matches np.quantile
    # exactly: v = m q - 1, take floor(v) when v is an integer and floor(v) + 1 otherwise, clipped into the row.
    v = m * q - 1.0
    prev = np.floor(v)
    idx = np.where(v - prev == 0, prev, prev + 1.0)
    idx = np.clip(idx, 0, np.maximum(m - 1, 0)).astype(np.intp)
    val = np.take_along_axis(xs, idx[:, None], axis=1)[:, 0]
    return np.where(m > 0, val, np.nan)
