"""The data as it was known on a date: every table cut at an origin, monthly sources at their publication lag.

A forecast made on an origin day may read only what had been published by then. A backtest
(:mod:`han_jax.app.backtest`) trains and forecasts at each origin from :func:`known_at`'s
world, so nothing dated on or after the origin reaches its inputs, its targets, its
normalisation or its baselines: the cut is made on the raw tables, before alignment.

What counts as known at origin ``o``:

* a daily source's rows dated before ``o``;
* a monthly source's months that ended ``lag`` months before ``o``'s month began, ``lag``
  its publication lag (``DataConfig.publication_lags``, default 0: a month is known once it
  has ended);
* the per-day targets of days before ``o`` and the per-month targets of months that ended
  before ``o``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, Sequence, Tuple

import numpy as np

from han_jax.data.world import DataError, DayTargets, MonthTargets, SourceTable, World, month_start, note, parse_day


def parse_origin(value, name: str = "data.known_at") -> np.datetime64:
    """``value`` as a day; anything else is a one-line ``DataError`` naming ``name``."""
    return parse_day(value, name)


def check_publication_lags(lags) -> dict:
    """``{source: months}`` from ``DataConfig.publication_lags``; a one-line ``DataError`` for a bad entry.

    Lags count back from an origin (``data.known_at``, set per origin by a backtest); a run
    without one reads all the data, and its data report says the lags were not applied.
    """
    lags = () if lags is None else lags
    out = {}
    for entry in lags:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                or isinstance(entry[1], bool) or not isinstance(entry[1], numbers.Integral) or entry[1] < 0):
            raise DataError(f"data.publication_lags entry {entry!r}; expected [source, months] with months an "
                            "integer >= 0")
        if entry[0] in out:
            raise DataError(f"data.publication_lags names '{entry[0]}' twice; expected one lag per source")
        out[entry[0]] = int(entry[1])
    return out


def _months_before(origin: np.datetime64, months: int) -> np.datetime64:
    """The start of the month ``months`` months before ``origin``'s month (datetime64[D])."""
    return (origin.astype("datetime64[M]") - np.timedelta64(months, "M")).astype("datetime64[D]")


def _cut_table(table: SourceTable, end: np.datetime64, kind: str, origin) -> SourceTable:
    keep = np.asarray(table.dates, "datetime64[D]") < end
    if not keep.any():
        raise DataError(f"{kind} source '{table.name}' ({table.origin}) has no record before {end} (data.known_at="
                        f"{origin}); expected an origin after its first record {np.asarray(table.dates)[0]}")
    return dataclasses.replace(table, dates=np.asarray(table.dates)[keep], values=np.asarray(table.values)[keep])


def known_at(world: World, origin, publication_lags: Sequence[Tuple[str, int]] = ()) -> World:
    """``world`` as it was known on ``origin`` (the module docstring says what that is).

    Args:
      world: the whole data.
      origin: the origin day (``YYYY-MM-DD`` or datetime64); usually a month start.
      publication_lags: ``[(monthly source, months)]``; sources not named have lag 0.

    Returns:
      A new :class:`World` (the tables are copies) whose report ends with one line saying what was cut.

    Raises:
      DataError: a lag naming a source the world has no monthly table for, or a source
        with no record before its cut.
    """
    day = parse_origin(origin)
    lags: Mapping[str, int] = check_publication_lags(publication_lags)
    unknown = sorted(set(lags) - set(world.monthly))
    if unknown:
        raise DataError(f"data.publication_lags names {unknown}; the data's monthly sources are "
                        f"{sorted(world.monthly)}")
    daily = {k: _cut_table(t, day, "daily", day) for k, t in world.daily.items()}
    monthly = {k: _cut_table(t, _months_before(day, lags.get(k, 0)), "monthly", day) for k, t in world.monthly.items()}
    dt = world.day_targets
    keep = np.asarray(dt.dates, "datetime64[D]") < day
    day_targets = DayTargets(
        **{f.name: (None if getattr(dt, f.name) is None else np.asarray(getattr(dt, f.name))[keep])
           for f in dataclasses.fields(DayTargets)})
    mt = world.month_targets
    # A month's totals are known once it has ended: months that start before the origin's month.
    mkeep = np.asarray(mt.months, "datetime64[D]") < month_start(np.asarray([day]))[0]
    month_targets = MonthTargets(np.asarray(mt.months)[mkeep], np.asarray(mt.fatalities)[mkeep],
                                 np.asarray(mt.casualty_valid)[mkeep])
    report = list(world.report)
    lag_text = ", ".join(f"{k} {v} month(s)" for k, v in sorted(lags.items())) or "none"
    note(report, f"data as known at {day}: records dated on or after it removed; monthly publication lags: {lag_text}")
    # A world's extras (a generator's latent series) are not dated tables a cut could make safe: left out.
    return World(daily, monthly, day_targets, month_targets, name=world.name, report=report)

