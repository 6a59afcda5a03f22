"""The original's delta-feature engineering (docs/data.md 1.2), ported from pandas to numpy.

Inputs are cumulative counters on a complete daily range (NaN where a day has no
record); outputs are the loaders' feature tables, NaN-free, in the original's
column order. Each helper reproduces the pandas call named in its docstring.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

PERSONNEL_FEATURES: Tuple[str, ...] = (
    "personnel_daily",
    "pow_daily",
    "personnel_7day_avg",
    "personnel_14day_avg",
    "personnel_30day_avg",
    "personnel_volatility_7d",
    "personnel_volatility_14d",
    "personnel_acceleration",
    "personnel_momentum_7d",
    "personnel_pct_change_7d",
    "pow_7day_avg",
    "intensity_ratio",
)

# The daily features that are ratios, not counts: ``personnel_pct_change_7d`` (``pct_change(7)``
# clipped to +-5) and ``intensity_ratio`` (daily / 30-day mean, clipped to +-5, NaN -> 1).
# Every other daily feature is a count or a count-scale statistic of the deltas (daily delta,
# rolling mean / std, acceleration, momentum), none already logged; ``DataConfig.count_transform``
# applies to those and leaves these alone (han_jax/data/transform.py).
RATIO_FEATURES: Tuple[str, ...] = ("personnel_pct_change_7d", "intensity_ratio")

# Equipment sources: (base counters, aggregate prefix), docs/data.md 1.2.
EQUIPMENT_SOURCES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "drones": (("drone", "cruise_missiles"), "drones"),
    "armor": (("tank", "APC"), "armor"),
    "artillery": (("field_artillery", "MRL", "anti_aircraft_warfare", "mobile_SRBM_system"), "artillery"),
    "aircraft": (("aircraft", "helicopter"), "aircraft"),
}


def equipment_feature_names(source: str) -> Tuple[str, ...]:
    cols, prefix = EQUIPMENT_SOURCES[source]
    names: List[str] = []
    for c in cols:
        names += [f"{c}_daily", f"{c}_7day_avg", f"{c}_volatility"]
    return tuple(names) + (f"{prefix}_total_daily", f"{prefix}_total_7day_avg", f"{prefix}_momentum")


def diff0(x: np.ndarray) -> np.ndarray:
    """``s.diff().fillna(0)``: NaN on either side of a step gives 0 (a gap's backlog is lost, as in the original)."""
    out = np.empty_like(x, dtype=np.float64)
    out[0] = np.nan
    out[1:] = x[1:] - x[:-1]
    return np.nan_to_num(out, nan=0.0)


def _windows(x: np.ndarray, w: int) -> np.ndarray:
    pad = np.concatenate([np.full(w - 1, np.nan), np.asarray(x, np.float64)])
    return sliding_window_view(pad, w)


def rolling_mean(x: np.ndarray, w: int, min_periods: int = 1) -> np.ndarray:
    """``s.rolling(w, min_periods).mean().fillna(0)``."""
    win = _windows(x, w)
    n = np.sum(~np.isnan(win), axis=1)
    s = np.nansum(win, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s / n
    return np.where(n >= min_periods, m, 0.0)


def rolling_std(x: np.ndarray, w: int, min_periods: int = 2) -> np.ndarray:
    """``s.rolling(w, min_periods).std().fillna(0)`` (ddof=1)."""
    win = _windows(x, w)
    n = np.sum(~np.isnan(win), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(win, axis=1) / n
        var = np.nansum((win - mean[:, None]) ** 2, axis=1) / (n - 1)
    out = np.sqrt(np.maximum(var, 0.0))
    return np.where(n >= max(min_periods, 2), out, 0.0)


def pct_change_clipped(x: np.ndarray, periods: int, lim: float = 5.0) -> np.ndarray:
    """``s.pct_change(periods).clip(-lim, lim).fillna(0)`` (x has no NaN here): x/0 -> ±inf -> ±lim, 0/0 -> 0."""
    prev = np.full_like(x, np.nan, dtype=np.float64)
    prev[periods:] = x[:-periods]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = x / prev - 1.0
    return np.nan_to_num(np.clip(r, -lim, lim), nan=0.0)


def personnel_features(personnel_cum: np.ndarray, pow_cum: np.ndarray | None) -> np.ndarray:
    """``load_personnel_daily``: 12 delta features from cumulative personnel and POW counters."""
    d = diff0(personnel_cum)
    pw = diff0(pow_cum) if pow_cum is not None else np.zeros_like(d)
    a7 = rolling_mean(d, 7)
    a14 = rolling_mean(d, 14)
    a30 = rolling_mean(d, 30)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = d / np.where(a30 == 0, np.nan, a30)
    ratio = np.nan_to_num(np.clip(ratio, -5.0, 5.0), nan=1.0)
    cols = [
        d,
        pw,
        a7,
        a14,
        a30,
        rolling_std(d, 7),
        rolling_std(d, 14),
        diff0(d),
        d - a7,
        pct_change_clipped(d, 7),
        rolling_mean(pw, 7),
        ratio,
    ]
    return np.stack(cols, axis=1)


def equipment_features(cumulative: Sequence[np.ndarray]) -> np.ndarray:
    """``_compute_delta_features``: per counter (daily, 7-day mean, 7-day std) plus 3 aggregates."""
    cols = []
    dailies = []
    for c in cumulative:
        d = diff0(c)
        dailies.append(d)
        cols += [d, rolling_mean(d, 7), rolling_std(d, 7)]
    total = np.sum(dailies, axis=0)
    t7 = rolling_mean(total, 7)
    cols += [total, t7, total - t7]
    return np.stack(cols, axis=1)


def viirs_anomaly(radiance: np.ndarray, window_days: int = 7) -> Tuple[np.ndarray, np.ndarray]:
    """``TargetLoader.get_viirs_anomaly`` on a complete daily axis (NaN = date absent).

    Rows in ``[t - window_days, t]`` that exist form the window (t included); fewer
    than 3 give 0, a std (ddof=1) under 0.001 gives 0. Valid = the date exists.
    """
    r = np.asarray(radiance, np.float64)
    win = _windows(r, window_days + 1)
    n = np.sum(~np.isnan(win), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(win, axis=1) / n
        var = np.nansum((win - mean[:, None]) ** 2, axis=1) / (n - 1)
        std = np.sqrt(np.maximum(var, 0.0))
        z = (r - mean) / std
    valid = ~np.isnan(r)
    z = np.where(valid & (n >= 3) & (std >= 0.001), z, 0.0)
    return np.nan_to_num(z), valid
