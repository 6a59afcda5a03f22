"""Target tables on the calendar, before they are cut per anchor.

Stages of ``build_datasets``: ``forecast_table`` (what the forecast head predicts
for each month) and ``target_tables`` (the world's per-day and per-month targets).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np

from han_jax.data.alignment import Calendar, SourceSelection
from han_jax.data.normalisation import NormalisedSources
from han_jax.data.world import World


@dataclasses.dataclass(frozen=True)
class ForecastTable:
    """Per-month forecast targets: monthly sources first, then monthly means of the daily ones."""

    values: np.ndarray  # float32 [n_months, sum of F], 0 where unobserved
    masks: np.ndarray  # bool [n_months, sum of F]


def forecast_table(normalised: NormalisedSources, sources: SourceSelection, calendar: Calendar) -> ForecastTable:
    """Each month's normalised monthly-source rows, then the means of the observed normalised daily values.

    Columns follow the selection's order (monthly sources, then daily sources);
    a daily feature with no observed day in the month is 0 and masked.
    """
    fc_vals, fc_masks = [], []
    for n in sources.monthly_names:
        fc_vals.append(np.where(normalised.monthly_masks[n], normalised.monthly[n], 0.0))
        fc_masks.append(normalised.monthly_masks[n])
    lo_b, hi_b = calendar.month_bounds[:, 0], calendar.month_bounds[:, 1]
    for n in sources.daily_names:
        m = normalised.daily_masks[n]
        v = np.where(m, normalised.daily[n], 0.0).astype(np.float64)
        cs_v = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
        cs_c = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(m, axis=0)])
        s = cs_v[hi_b] - cs_v[lo_b]
        c = cs_c[hi_b] - cs_c[lo_b]
        with np.errstate(invalid="ignore", divide="ignore"):
            agg = np.where(c > 0, s / np.maximum(c, 1), 0.0)
        fc_vals.append(agg.astype(np.float32))
        fc_masks.append(c > 0)
    return ForecastTable(np.concatenate(fc_vals, axis=1).astype(np.float32), np.concatenate(fc_masks, axis=1))


def target_tables(world: World, calendar: Calendar) -> Dict[str, np.ndarray]:
    """The world's targets on the calendar, keyed by ``Targets`` field name.

    Per day (``[n_days]``): ``phase_index`` (10 where invalid), ``phase_valid``,
    ``is_transition``, ``anomaly`` (0 where invalid), ``anomaly_valid``. Per month
    (``[n_months]``): ``fatalities`` (raw counts, 0 where invalid), ``casualty_valid``.
    Days and months the world does not list are invalid.
    """
    cal = calendar
    n, m = cal.n_days, cal.n_months
    dt = world.day_targets
    out = {
        "phase_index": np.full(n, 10, np.int32),
        "phase_valid": np.zeros(n, bool),
        "is_transition": np.zeros(n, bool),
        "anomaly": np.zeros(n, np.float32),
        "anomaly_valid": np.zeros(n, bool),
        "fatalities": np.zeros(m, np.float32),
        "casualty_valid": np.zeros(m, bool),
    }
    idx = (np.asarray(dt.dates, "datetime64[D]") - cal.start).astype(np.int64)
    ok = (idx >= 0) & (idx < n)
    for k in ("phase_index", "phase_valid", "is_transition", "anomaly", "anomaly_valid"):
        out[k][idx[ok]] = np.asarray(getattr(dt, k))[ok]
    out["phase_index"] = np.where(out["phase_valid"], out["phase_index"], 10).astype(np.int32)
    out["anomaly"] = np.where(out["anomaly_valid"], np.nan_to_num(out["anomaly"]), 0.0).astype(np.float32)
    mt = world.month_targets
    if len(mt.months):
        midx = (np.asarray(mt.months, "datetime64[M]") - cal.start.astype("datetime64[M]")).astype(np.int64)
        ok = (midx >= 0) & (midx < m)
        out["fatalities"][midx[ok]] = np.asarray(mt.fatalities)[ok]
        out["casualty_valid"][midx[ok]] = np.asarray(mt.casualty_valid, bool)[ok]
        out["fatalities"] = np.where(out["casualty_valid"], np.nan_to_num(out["fatalities"]), 0.0).astype(np.float32)
    return out
