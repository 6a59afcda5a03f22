"""Source selection and the shared calendar every selected source is aligned to.

Stages of ``build_datasets``: ``select_sources`` -> ``data_calendar`` -> ``align_sources``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from han_jax.data.world import DataError, SourceTable, World, to_day

Layout = Tuple[Tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Calendar:
    """The shared daily and monthly axes (``compute_temporal_alignment``)."""

    start: np.datetime64
    end: np.datetime64
    day_dates: np.ndarray  # datetime64[D] [T]
    month_starts: np.ndarray  # datetime64[D] [M]
    month_of_day: np.ndarray  # int64 [T]
    month_bounds: np.ndarray  # int64 [M, 2], (first day, last day + 1)

    @property
    def n_days(self) -> int:
        return len(self.day_dates)

    @property
    def n_months(self) -> int:
        return len(self.month_starts)

    def day_index(self, date) -> int:
        return int((to_day(date) - self.start).astype(np.int64))


def make_calendar(start, end) -> Calendar:
    """Every day ``start..end`` (inclusive) and every month they touch; months may start before ``start``."""
    start, end = to_day(start), to_day(end)
    if end < start:
        raise DataError(f"calendar: end date {end} is before start date {start}")
    days = np.arange(start, end + 1)
    months = np.arange(start.astype("datetime64[M]"), end.astype("datetime64[M]") + 1)
    mstarts = months.astype("datetime64[D]")
    mends = (months + 1).astype("datetime64[D]")
    lo = np.clip((mstarts - start).astype(np.int64), 0, len(days))
    hi = np.clip((mends - start).astype(np.int64), 0, len(days))
    mod = (days.astype("datetime64[M]") - months[0]).astype(np.int64)
    return Calendar(start, end, days, mstarts, mod, np.stack([lo, hi], axis=1))


@dataclasses.dataclass(frozen=True)
class SourceSelection:
    """The world's sources a config selects, in the config's order.

    Names are the world's keys, repeated if the config repeats them (the layouts
    then repeat them too); ``daily`` / ``monthly`` map each name to its table.
    """

    daily_names: Tuple[str, ...]
    monthly_names: Tuple[str, ...]
    daily: Dict[str, SourceTable]
    monthly: Dict[str, SourceTable]

    @property
    def daily_layout(self) -> Layout:
        return tuple((n, self.daily[n].n_features) for n in self.daily_names)

    @property
    def monthly_layout(self) -> Layout:
        return tuple((n, self.monthly[n].n_features) for n in self.monthly_names)

    def all_dates(self) -> List[np.ndarray]:
        """Each selected source's dates (datetime64[D]), daily sources first."""
        return ([np.asarray(self.daily[n].dates, "datetime64[D]") for n in self.daily_names]
                + [np.asarray(self.monthly[n].dates, "datetime64[D]") for n in self.monthly_names])


@dataclasses.dataclass(frozen=True)
class AlignedSources:
    """Selected sources reindexed to the calendar without fill (float64, NaN = missing).

    ``*_rows`` are the row masks recomputed from the data (``_realign_sources``):
    True where any feature of the row is present.
    """

    daily: Dict[str, np.ndarray]  # [n_days, F]
    monthly: Dict[str, np.ndarray]  # [n_months, F]
    daily_rows: Dict[str, np.ndarray]  # bool [n_days]
    monthly_rows: Dict[str, np.ndarray]  # bool [n_months]


def select_sources(world: World, *, daily, monthly) -> SourceSelection:
    """Pick and order the world's sources by the config's ``daily_sources`` / ``monthly_sources`` specs.

    A spec of ``None`` takes every source in the world's order; ``(name, n_features)``
    entries have their feature count checked. At least one daily source is required.
    """
    d_names = _resolve_sources("daily", daily, world.daily)
    m_names = _resolve_sources("monthly", monthly, world.monthly)
    if not d_names:
        raise DataError("no daily sources selected; expected at least one")
    return SourceSelection(
        daily_names=tuple(d_names),
        monthly_names=tuple(m_names),
        daily={n: world.daily[n] for n in d_names},
        monthly={n: world.monthly[n] for n in m_names},
    )


def data_calendar(
    source_dates: Sequence[np.ndarray],
    *,
    start_date: str,
    end_date: Optional[str],
    daily_seq_len: int,
    monthly_seq_len: int,
) -> Calendar:
    """The calendar of the data (docs/data.md 1.4), checked to hold one window.

    Start = max(``start_date``, earliest source date); end = the latest source date,
    or ``end_date`` when that is earlier. Raises if ``daily_seq_len`` days or
    ``monthly_seq_len`` months do not fit.
    """
    lo = min(d.min() for d in source_dates)
    hi = max(d.max() for d in source_dates)
    start = max(to_day(start_date), lo)
    end = min(to_day(end_date), hi) if end_date else hi
    cal = make_calendar(start, end)
    T, M, n_days, n_months = daily_seq_len, monthly_seq_len, cal.n_days, cal.n_months
    if T < 1 or M < 1:
        raise DataError(f"daily_seq_len={T}, monthly_seq_len={M}; expected both >= 1")
    if T > n_days:
        raise DataError(
            f"daily_seq_len={T} is longer than the data: the calendar {cal.start}..{cal.end} has {n_days} days"
        )
    if M > n_months:
        raise DataError(
            f"monthly_seq_len={M} is longer than the data: the calendar {cal.start}..{cal.end} has {n_months} months"
        )
    return cal


def align_sources(sources: SourceSelection, calendar: Calendar) -> AlignedSources:
    """Reindex every selected source to the calendar (rows outside its dates are NaN) and recompute row masks."""
    raw_d = {n: _reindex(sources.daily[n], calendar.start, calendar.n_days, False) for n in sources.daily_names}
    raw_m = {n: _reindex(sources.monthly[n], calendar.start, calendar.n_months, True) for n in sources.monthly_names}
    row_d = {n: ~np.all(np.isnan(x), axis=1) for n, x in raw_d.items()}
    row_m = {n: ~np.all(np.isnan(x), axis=1) for n, x in raw_m.items()}
    return AlignedSources(raw_d, raw_m, row_d, row_m)


def _resolve_sources(kind: str, spec, table: Dict[str, SourceTable]) -> List[str]:
    if spec is None:
        return list(table)
    names = []
    for entry in spec:
        name, expected = (entry, None) if isinstance(entry, str) else (entry[0], int(entry[1]))
        if name not in table:
            raise DataError(
                f"{kind} source '{name}' is not in the data; available {kind} sources: {list(table)}"
            )
        got = table[name].n_features
        if expected is not None and got != expected:
            raise DataError(
                f"{kind} source '{name}' ({table[name].origin}) has {got} features, expected {expected}"
            )
        names.append(name)
    return names


def _reindex(t: SourceTable, axis_start: np.datetime64, n: int, monthly: bool) -> np.ndarray:
    """Reindex a source to the calendar without fill (rows outside its dates are NaN)."""
    out = np.full((n, t.n_features), np.nan, dtype=np.float64)
    d = np.asarray(t.dates, dtype="datetime64[D]")
    if monthly:
        idx = (d.astype("datetime64[M]") - axis_start.astype("datetime64[M]")).astype(np.int64)
    else:
        idx = (d - axis_start).astype(np.int64)
    ok = (idx >= 0) & (idx < n)
    out[idx[ok]] = t.values[ok]
    return out
