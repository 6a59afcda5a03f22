"""The raw tables every data source produces, before calendar alignment.

A ``World`` is what a loader (synthetic or real) hands to the pipeline: per-source
daily and monthly tables with their own dates (NaN = missing), plus per-day and
per-month target tables. Everything after this point (alignment, masks,
normalisation, windows, splits) is shared by all sources of data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("han_jax.data")


class DataError(ValueError):
    """Bad input data; the message names the file / source / field and what was expected."""


class MissingFileError(DataError, FileNotFoundError):
    """A required input file does not exist."""


def to_day(x) -> np.datetime64:
    return np.datetime64(x, "D")


def parse_day(value, name: str) -> np.datetime64:
    """``value`` as a day (datetime64[D]); anything else is a one-line ``DataError`` naming ``name``."""
    try:
        day = to_day(value)
    except (ValueError, TypeError):
        raise DataError(f"{name}={value!r}; expected a date YYYY-MM-DD") from None
    if np.isnat(day):
        raise DataError(f"{name}={value!r}; expected a date YYYY-MM-DD")
    return day


def month_start(days: np.ndarray) -> np.ndarray:
    """datetime64[D] -> the first day of each one's month (datetime64[D])."""
    return np.asarray(days, dtype="datetime64[D]").astype("datetime64[M]").astype("datetime64[D]")


@dataclasses.dataclass
class SourceTable:
    """One source on its own dates.

    ``dates`` are datetime64[D], strictly increasing; monthly sources use month
    starts. ``values`` is float64 ``[N, F]`` with NaN where missing. ``origin``
    (a file path or "synthetic") is what error messages point at. ``counts``
    marks a monthly source built from daily counts (every feature a count-scale
    statistic of them): ``DataConfig.count_transform`` applies to it as to the
    daily counts, so inputs and forecast targets grow on the same scale.
    """

    name: str
    dates: np.ndarray
    values: np.ndarray
    feature_names: Tuple[str, ...]
    origin: str = "synthetic"
    counts: bool = False

    @property
    def n_features(self) -> int:
        return int(self.values.shape[1])

    def validate(self, kind: str) -> None:
        where = f"{kind} source '{self.name}' ({self.origin})"
        v = np.asarray(self.values)
        if v.ndim != 2:
            raise DataError(f"{where}: values must be 2-D [dates, features], got shape {v.shape}")
        if len(self.dates) != v.shape[0]:
            raise DataError(f"{where}: {len(self.dates)} dates but {v.shape[0]} rows")
        if len(self.feature_names) != v.shape[1]:
            raise DataError(
                f"{where}: {len(self.feature_names)} feature names but {v.shape[1]} feature columns"
            )
        check_dates(self.dates, where)
        if kind == "monthly":
            d = np.asarray(self.dates, dtype="datetime64[D]")
            if np.any(month_start(d) != d):
                bad = d[month_start(d) != d][0]
                raise DataError(f"{where}: monthly dates must be month starts, got {bad}")
        if v.shape[0] and v.shape[1]:
            all_nan = np.all(np.isnan(v), axis=0)
            if np.any(all_nan):
                names = [self.feature_names[i] for i in np.flatnonzero(all_nan)]
                raise DataError(f"{where}: column(s) {names} are entirely NaN; expected some observed values")


def check_dates(dates: np.ndarray, where: str) -> None:
    """Dates must be strictly increasing (no duplicates, no disorder)."""
    d = np.asarray(dates, dtype="datetime64[D]")
    if len(d) == 0:
        raise DataError(f"{where}: no dates; expected at least one record")
    if np.any(np.isnat(d)):
        raise DataError(f"{where}: unparseable (NaT) dates")
    step = np.diff(d).astype(np.int64)
    if np.any(step == 0):
        i = int(np.flatnonzero(step == 0)[0])
        raise DataError(f"{where}: duplicate date {d[i]}; expected strictly increasing dates")
    if np.any(step < 0):
        i = int(np.flatnonzero(step < 0)[0])
        raise DataError(
            f"{where}: dates not monotonic ({d[i]} is followed by {d[i + 1]}); expected strictly increasing dates"
        )


@dataclasses.dataclass
class DayTargets:
    """Per-day targets on their own dates; days not listed are invalid."""

    dates: np.ndarray  # datetime64[D]
    phase_index: np.ndarray  # int
    phase_valid: np.ndarray  # bool
    is_transition: np.ndarray  # bool
    anomaly: np.ndarray  # float
    anomaly_valid: np.ndarray  # bool
    n_active_operations: Optional[np.ndarray] = None


@dataclasses.dataclass
class MonthTargets:
    """Per-month targets keyed by month start; months not listed are invalid."""

    months: np.ndarray  # datetime64[D] month starts
    fatalities: np.ndarray  # float, raw counts
    casualty_valid: np.ndarray  # bool


@dataclasses.dataclass
class World:
    """Raw daily/monthly source tables plus target tables, in load order."""

    daily: Dict[str, SourceTable]
    monthly: Dict[str, SourceTable]
    day_targets: DayTargets
    month_targets: MonthTargets
    name: str = "world"
    report: List[str] = dataclasses.field(default_factory=list)
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def daily_sources(self) -> Tuple[Tuple[str, int], ...]:
        return tuple((k, t.n_features) for k, t in self.daily.items())

    @property
    def monthly_sources(self) -> Tuple[Tuple[str, int], ...]:
        return tuple((k, t.n_features) for k, t in self.monthly.items())

    def validate(self) -> None:
        for t in self.daily.values():
            t.validate("daily")
        for t in self.monthly.values():
            t.validate("monthly")
        check_dates(self.day_targets.dates, f"day targets of world '{self.name}'")
        if len(self.month_targets.months):
            check_dates(self.month_targets.months, f"month targets of world '{self.name}'")
        f = np.asarray(self.month_targets.fatalities, dtype=np.float64)
        ok = np.asarray(self.month_targets.casualty_valid, bool)
        if np.any(ok & (f < 0)):
            i = int(np.flatnonzero(ok & (f < 0))[0])
            raise DataError(
                f"month targets of world '{self.name}': fatalities {f[i]} in {self.month_targets.months[i]} "
                "is negative; expected counts >= 0"
            )


def note(report: List[str], msg: str) -> None:
    """Record a loader decision both in the returned report and the log."""
    report.append(msg)
    log.info(msg)

