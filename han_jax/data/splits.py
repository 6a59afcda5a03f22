"""Split boundaries, anchors and the per-split arrays batches are gathered from (docs/data.md 2 and 4).

Stages of ``build_datasets``: ``split_day_ranges`` runs early (normalisation
needs the end of train); ``split_anchors`` -> ``assemble_split`` run last.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from han_jax.data.alignment import Calendar, Layout
from han_jax.data.target_tables import ForecastTable
from han_jax.data.world import DataError


@dataclasses.dataclass
class ArrayStore:
    """Normalised calendar arrays shared by the three splits.

    ``daily[src]`` / ``monthly[src]`` hold float32 with the -999 sentinel where
    missing (what the original keeps on disk); masks are True = observed.
    """

    daily: Dict[str, np.ndarray]
    daily_masks: Dict[str, np.ndarray]
    monthly: Dict[str, np.ndarray]
    monthly_masks: Dict[str, np.ndarray]
    daily_sources: Layout
    monthly_sources: Layout
    daily_seq_len: int
    monthly_seq_len: int
    missing_value: float
    daily_forecast_horizon: Optional[int]


@dataclasses.dataclass
class SplitData:
    """One split: anchor days plus everything per anchor that does not need a window gather."""

    name: str
    anchors: np.ndarray  # int64 [N] day indices
    anchor_months: np.ndarray  # int64 [N]
    stride: int
    day_range: Tuple[int, int]  # [start, end) of the split's days
    month_boundaries: np.ndarray  # int32 [N, M, 2]
    targets: Dict[str, np.ndarray]  # per-anchor target arrays (Targets field names)
    store: ArrayStore

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def daily_sources(self) -> Layout:
        return self.store.daily_sources

    @property
    def monthly_sources(self) -> Layout:
        return self.store.monthly_sources


@dataclasses.dataclass(frozen=True)
class SplitAnchors:
    """A split's anchor days (the last day of each sample's window) and how they were taken."""

    name: str
    days: np.ndarray  # int64 [N] day indices
    stride: int
    day_range: Tuple[int, int]  # [start, end) of the split's days


def split_day_ranges(
    n_days: int, *, val_ratio: float, test_ratio: float, embargo_days: int
) -> Dict[str, Tuple[int, int]]:
    """``{"train"|"val"|"test": [start, end)}`` day ranges: chronological, test last.

    Val and test hold ``int(n_days * ratio)`` days (at least 1); ``embargo_days``
    drops that many days at the start of val and of test. Raises if no train days remain.
    """
    n_test = max(1, int(n_days * test_ratio))
    n_val = max(1, int(n_days * val_ratio))
    train_end = n_days - n_test - n_val
    val_end = train_end + n_val
    if train_end <= 0:
        raise DataError(f"val_ratio={val_ratio} + test_ratio={test_ratio} leave no train days of {n_days}")
    return {
        "train": (0, train_end),
        "val": (min(train_end + embargo_days, val_end), val_end),
        "test": (min(val_end + embargo_days, n_days), n_days),
    }


def split_anchors(
    calendar: Calendar,
    ranges: Dict[str, Tuple[int, int]],
    *,
    daily_seq_len: int,
    monthly_seq_len: int,
    prediction_horizon: int,
    val_sample_stride: Optional[int],
) -> Dict[str, SplitAnchors]:
    """Each split's anchors: days whose window fits and whose forecast month exists.

    A day is valid if its ``daily_seq_len`` days and the ``monthly_seq_len`` months
    ending on its month lie in the calendar, and its month + ``prediction_horizon``
    is at most the month count. Train takes every valid day; val/test take every
    ``val_sample_stride``-th (default: the original's automatic stride). Raises for
    a split with no valid anchor.
    """
    cal = calendar
    T, M, n_days, n_months = daily_seq_len, monthly_seq_len, cal.n_days, cal.n_months
    all_days = np.arange(n_days)
    ok = (all_days - T + 1 >= 0) & (cal.month_of_day - M + 1 >= 0) & (cal.month_of_day + prediction_horizon <= n_months)
    out = {}
    for name, (a, b) in ranges.items():
        valid = all_days[a:b][ok[a:b]]
        stride = 1
        if name != "train" and len(valid) > 1:
            stride = val_sample_stride or _auto_stride(len(valid), T)
            valid = valid[::stride]
        if len(valid) == 0:
            raise DataError(
                f"split '{name}' has no valid anchors: its days {a}..{b - 1} of {n_days} "
                f"({cal.start}..{cal.end}) cannot hold a window of daily_seq_len={T} days and "
                f"monthly_seq_len={M} months; expected more data or shorter windows"
            )
        out[name] = SplitAnchors(name, valid, stride, (a, b))
    return out


def _auto_stride(n_valid: int, daily_seq_len: int) -> int:
    """The original's automatic val/test stride: the largest s <= T//2 keeping min(10, n) samples."""
    min_samples = min(10, n_valid)
    for s in range(max(1, daily_seq_len // 2), 0, -1):
        if -(-n_valid // s) >= min_samples:
            return s
    return 1


def assemble_split(
    anchors: SplitAnchors,
    *,
    calendar: Calendar,
    store: ArrayStore,
    targets: Dict[str, np.ndarray],
    forecast: ForecastTable,
    prediction_horizon: int,
) -> SplitData:
    """One split's per-anchor arrays: month boundaries in the window, targets, forecast targets, obs rates.

    Windows are ``store.daily_seq_len`` days / ``store.monthly_seq_len`` months ending
    on the anchor; ``targets`` are the calendar tables of ``target_tables``.
    """
    cal = calendar
    T, M, h = store.daily_seq_len, store.monthly_seq_len, prediction_horizon
    days = np.asarray(anchors.days, np.int64)
    am = cal.month_of_day[days]
    months = am[:, None] + np.arange(-M + 1, 1)[None, :]  # [N, M]
    # Month boundaries relative to the window, clipped to [0, T] with start <= end.
    dstart = days - T + 1
    inside = (months >= 0) & (months < cal.n_months)
    mb = cal.month_bounds[np.clip(months, 0, cal.n_months - 1)]  # [N, M, 2]
    rel = np.clip(mb - dstart[:, None, None], 0, T)
    rel[..., 0] = np.minimum(rel[..., 0], rel[..., 1])
    rel = np.where(inside[..., None], rel, 0).astype(np.int32)

    # Next-month forecast targets; a window reaching past the last month is wholly invalid.
    fmonths = months + h
    f_ok = (am + h) < cal.n_months
    fi = np.clip(fmonths, 0, cal.n_months - 1)
    ft = forecast.values[fi] * f_ok[:, None, None]
    fm = forecast.masks[fi] & f_ok[:, None, None]

    first_d = store.daily_sources[0][0]
    cs = np.concatenate([[0.0], np.cumsum(store.daily_masks[first_d].mean(axis=1))])
    d_obs = ((cs[days + 1] - cs[days + 1 - T]) / T).astype(np.float32)
    per_anchor = {
        "phase_index": targets["phase_index"][days],
        "phase_valid": targets["phase_valid"][days],
        "is_transition": targets["is_transition"][days],
        "fatalities": targets["fatalities"][am],
        "casualty_valid": targets["casualty_valid"][am],
        "anomaly": targets["anomaly"][days],
        "anomaly_valid": targets["anomaly_valid"][days],
        "forecast_targets": ft.astype(np.float32),
        "forecast_masks": fm,
        "daily_obs_rate": d_obs,
    }
    if store.monthly_sources:
        first_m = store.monthly_sources[0][0]
        per_month = store.monthly_masks[first_m].mean(axis=1)
        per_anchor["monthly_obs_rate"] = per_month[months].mean(axis=1).astype(np.float32)
    return SplitData(anchors.name, days, am, anchors.stride, tuple(int(x) for x in anchors.day_range), rel,
                     per_anchor, store)
