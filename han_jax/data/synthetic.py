"""Deterministic synthetic world following data.md section 7 (an offline stand-in for the real sources).

The generator produces the same raw tables the original's loaders produce
(cumulative counters turned into the delta features, monthly tables with their
own coverage, per-day and per-month targets); the shared pipeline then treats
them exactly like real data.

Two modes:
  * ``realistic``: the original's quirks: a timeline shaped like the real one
    with the last phase absorbing for the final ~35 % of days (val/test are
    single-class with no transitions), sentinel coverage only months 3..34 and
    VIIRS coverage ending on 2024-12-31 (no anomaly targets in val/test).
  * ``learnable`` (the default for training): a semi-Markov chain whose coarse
    classes recur in every split, stronger regime fingerprints in the
    equipment mix, and sentinel/VIIRS coverage to the end, so accuracy and the
    anomaly loss can be measured on val/test. This deliberately departs from the
    original's data to make evaluation meaningful.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from han_jax.config import (
    DAILY_SOURCES,
    MONTHLY_SOURCES,
    PHASE_TO_COARSE,
    SMALL_DAILY_SOURCES,
    SMALL_MONTHLY_SOURCES,
)
from han_jax.data import features as fe
from han_jax.data.timeline import BASELINE
from han_jax.data.world import DataError, DayTargets, MonthTargets, SourceTable, World, note

PRESETS = {
    "default": dict(n_days=1434, daily=DAILY_SOURCES, monthly=MONTHLY_SOURCES),
    "small": dict(n_days=300, daily=SMALL_DAILY_SOURCES, monthly=SMALL_MONTHLY_SOURCES),
}

# The real timeline's segments (phase, days) before the absorbing Kursk phase (data.md 5).
_REAL_SEGMENTS = ((0, 71), (3, 51), (10, 36), (5, 293), (10, 14), (6, 128), (7, 131), (10, 82), (8, 52), (10, 36))
_ABSORBING = 9

# Equipment counters: mean per day = lam * w (* drone growth), NB dispersion theta;
# zero-inflated "burst" types: P(nonzero), burst mean.
_NB_TYPES = {
    "tank": (1 / 100, 3.0),
    "APC": (1 / 50, 3.0),
    "field_artillery": (1 / 40, 3.0),
    "MRL": (1 / 400, 2.0),
    "anti_aircraft_warfare": (1 / 900, 2.0),
    "drone": (1 / 60, 4.0),
}
_BURST_TYPES = {
    "cruise_missiles": (0.08, 8.0),
    "mobile_SRBM_system": (0.03, 1.0),
    "aircraft": (0.05, 1.0),
    "helicopter": (0.05, 1.0),
}
_TYPE_ORDER = tuple(_NB_TYPES) + tuple(_BURST_TYPES)
_FOOD = ("bread", "wheat_flour", "potatoes", "oil", "milk")
_EVENT_TYPES = ("civilian_targeting", "demonstration", "political_violence")


def _nb(rng, mean, theta):
    mean = np.maximum(np.asarray(mean, np.float64), 1e-9)
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float64)


def _regimes_realistic(rng, n):
    durs = np.array([d for _, d in _REAL_SEGMENTS], np.float64) * np.exp(rng.normal(0, 0.2, len(_REAL_SEGMENTS)))
    phases = [p for p, _ in _REAL_SEGMENTS]
    durs = np.where(np.array(phases) == BASELINE, np.clip(durs, 14, 90), durs)
    durs = np.maximum(3, np.round(durs * (0.65 * n) / durs.sum())).astype(int)
    seq = np.concatenate([np.full(d, p) for p, d in zip(phases, durs)] + [np.full(n, _ABSORBING)])
    return seq[:n].astype(np.int32)


def _regimes_learnable(rng, n):
    """Alternate operations (coarse class never repeated back to back) with short baseline gaps."""
    by_coarse = {c: [p for p in range(10) if PHASE_TO_COARSE[p] == c] for c in range(4)}
    scale = max(n / 1434.0, 0.3)
    seq, prev = [], -1
    while sum(len(s) for s in seq) < n:
        c = rng.choice([k for k in range(4) if k != prev])
        p = rng.choice(by_coarse[c])
        d = int(np.clip(rng.lognormal(np.log(55), 0.5), 14, 150) * scale)
        seq.append(np.full(max(d, 5), p))
        prev = c
        if rng.random() < 0.5:
            seq.append(np.full(max(int(rng.integers(14, 60) * scale), 4), BASELINE))
            prev = PHASE_TO_COARSE[BASELINE]
    return np.concatenate(seq)[:n].astype(np.int32)


def _split_classes_ok(phase, n):
    n_t = int(n * 0.15)
    coarse = np.asarray(PHASE_TO_COARSE)[phase]
    val, test = coarse[n - 2 * n_t : n - n_t], coarse[n - n_t :]
    return len(np.unique(val)) >= 2 and len(np.unique(test)) >= 2 and len(np.unique(coarse[: n - 2 * n_t])) == 4


def make_synthetic_world(
    seed: int = 0,
    mode: str = "learnable",
    preset: str = "default",
    *,
    n_days: Optional[int] = None,
    start: str = "2022-02-24",
    daily_sources: Optional[Sequence[str]] = None,
    monthly_sources: Optional[Sequence[str]] = None,
    viirs_end: Optional[str] = None,
    sentinel_months: Optional[Tuple[int, int]] = None,
    missing_casualty_months: Sequence[int] = (),
    casualty_leakage: bool = True,
) -> World:
    """A deterministic synthetic ``World`` (same seed, same arrays).

    ``viirs_end`` / ``sentinel_months`` override the coverage windows (mode
    defaults: realistic 2024-12-31 and months 3..34; learnable: to the end).
    ``missing_casualty_months`` lists month indices with no conflict rows at all
    (their casualty target is invalid and the hdx_conflict row missing).
    ``casualty_leakage=False`` lags the hdx_conflict ``fatalities`` input by one
    month so the anchor month's target is not in the inputs.
    """
    if mode not in ("learnable", "realistic"):
        raise DataError(f"synthetic mode '{mode}'; expected 'learnable' or 'realistic'")
    if preset not in PRESETS:
        raise DataError(f"synthetic preset '{preset}'; expected one of {list(PRESETS)}")
    pre = PRESETS[preset]
    n = int(n_days or pre["n_days"])
    if n < 40:
        raise DataError(f"synthetic n_days={n}; expected >= 40")
    d_names = tuple(daily_sources or [s for s, _ in pre["daily"]])
    m_names = tuple(monthly_sources or [s for s, _ in pre["monthly"]])
    learn = mode == "learnable"
    rng = np.random.default_rng([int(seed), 1 if learn else 0])
    start_d = np.datetime64(start, "D")
    dates = start_d + np.arange(n)
    t = np.arange(n, dtype=np.float64)
    report = []

    # 1. Regime chain.
    if learn:
        for _ in range(50):
            phase = _regimes_learnable(rng, n)
            if _split_classes_ok(phase, n):
                break
    else:
        phase = _regimes_realistic(rng, n)
    trans = np.ones(n, bool)
    trans[1:] = phase[1:] != phase[:-1]
    n_active = (phase != BASELINE).astype(np.int32)
    n_active[: min(n, 38)] = np.where(phase[: min(n, 38)] != BASELINE, 3, 0)

    # 2. Intensity: rising trend + regime effect + AR(1) + decaying shocks.
    coarse = np.asarray(PHASE_TO_COARSE)[phase]
    trend = np.log(240.0) + np.log(6.0) * np.clip((t - 130.0) / 870.0, -0.2, 1.15)
    if learn:
        eff_phase = np.array([-0.35, -0.1, 0.2, 0.4])[np.asarray(PHASE_TO_COARSE)] + rng.normal(0, 0.1, 11)
        mix_sigma = 0.45
    else:
        eff_phase = rng.normal(0, 0.15, 11)
        mix_sigma = 0.1
    eff_phase[BASELINE] = -0.2
    noise = np.zeros(n)
    fast = np.zeros(n)  # short-memory part: what makes the 7-day drone lead visible over the shared trend
    shock = np.zeros(n)
    eps = rng.normal(0, 0.08, n)
    eps_fast = rng.normal(0, 0.25, n)
    hits = rng.random(n) < 0.004
    mags = rng.uniform(0.3, 0.8, n)
    for i in range(1, n):
        noise[i] = 0.97 * noise[i - 1] + eps[i]
        fast[i] = 0.5 * fast[i - 1] + eps_fast[i]
        shock[i] = 0.8 * shock[i - 1] + (mags[i] if hits[i] else 0.0)
    log_lam = trend + eff_phase[phase] + noise + fast + shock
    lam = np.exp(log_lam)
    # Per-phase equipment mix: the regime's fingerprint in the inputs.
    mix = np.exp(rng.normal(0, mix_sigma, (11, len(_TYPE_ORDER))))

    # 3. Cumulative counters on days 1..n-1 (day 0 unobserved, as the real source).
    src_dates = dates[1:]
    gaps = rng.random(n - 1) < 0.01
    corr = rng.random(n - 1) < 0.002
    inc = {"personnel": _nb(rng, lam[1:], 5.0)}
    inc["POW"] = _nb(rng, 0.02 * lam[1:], 1.0)
    lam_lead = np.concatenate([lam[7:], np.full(7, lam[-1])])  # drones lead personnel by ~7 days
    for j, k in enumerate(_TYPE_ORDER):
        m = mix[phase[1:], j]
        if k in _NB_TYPES:
            w, theta = _NB_TYPES[k]
            base = lam_lead[1:] * (1 + t[1:] / 250.0) ** 1.5 if k == "drone" else lam[1:]
            inc[k] = _nb(rng, base * w * m, theta)
        else:
            p, burst = _BURST_TYPES[k]
            nz = rng.random(n - 1) < np.clip(p * m * lam[1:] / lam.mean(), 0, 0.2)
            inc[k] = nz * (1 + rng.poisson(burst * m))
    cum = {}
    for k, v in inc.items():
        v = v.copy()
        v[corr] = -np.ceil(0.3 * np.abs(v[corr]) + 1)  # rare negative corrections
        c = np.cumsum(v) + 10.0
        c[gaps] = np.nan
        cum[k] = c
    pow_end = min(n - 1, 62)  # POW reported for the first ~2 months only
    cum["POW"][pow_end:] = np.nan
    srbm_start = min(n - 2, 36)  # SRBM column starts late (month 3+)
    cum["mobile_SRBM_system"][:srbm_start] = np.nan

    daily: Dict[str, SourceTable] = {}
    for name in d_names:
        if name == "personnel":
            vals, fnames = fe.personnel_features(cum["personnel"], cum["POW"]), fe.PERSONNEL_FEATURES
        elif name in fe.EQUIPMENT_SOURCES:
            cols, _ = fe.EQUIPMENT_SOURCES[name]
            vals, fnames = fe.equipment_features([cum[c] for c in cols]), fe.equipment_feature_names(name)
        else:
            raise DataError(f"synthetic daily source '{name}' is unknown; expected one of "
                            f"{['personnel'] + list(fe.EQUIPMENT_SOURCES)}")
        daily[name] = SourceTable(name, src_dates, vals, tuple(fnames), "synthetic")

    # 4-5. Months, conflict rows, monthly sources.
    months_m = np.arange(dates[0].astype("datetime64[M]"), dates[-1].astype("datetime64[M]") + 1)
    n_months = len(months_m)
    mstarts = months_m.astype("datetime64[D]")
    month_of_day = (dates.astype("datetime64[M]") - months_m[0]).astype(np.int64)
    lam_month = np.bincount(month_of_day, lam) / np.bincount(month_of_day)
    moy = (months_m.astype(np.int64) % 12)  # 0 = January
    present = np.ones(n_months, bool)
    for m in missing_casualty_months:
        if 0 <= m < n_months:
            present[m] = False

    n_admin = 133
    admin_w = rng.dirichlet(np.full(n_admin, 2.0))
    rows = []
    for m in range(n_months):
        if not present[m]:
            continue
        # National totals follow intensity sub-linearly so they stay in ~1e3..1e4 with CV ~0.3-0.6.
        total = 3000.0 * (lam_month[m] / lam_month.mean()) ** 0.6 * np.exp(rng.normal(0, 0.15))
        type_share = np.array([0.1, 0.05, 0.85])
        mu = total * admin_w[:, None] * type_share[None, :] / 0.25  # 75 % of rows are zero
        fat = _nb(rng, mu, 2.0) * (rng.random((n_admin, 3)) < 0.25)
        ev = _nb(rng, 60 * lam_month[m] / 1000 * admin_w[:, None] * n_admin * np.array([0.6, 0.2, 1.0]), 1.0)
        rows.append((np.full((n_admin, 3), m), np.arange(n_admin)[:, None].repeat(3, 1),
                     np.arange(3)[None, :].repeat(n_admin, 0), ev, fat))
    if rows:
        cr = {k: np.concatenate([r[i].ravel() for r in rows]) for i, k in
              enumerate(("month", "admin2", "event_type", "events", "fatalities"))}
    else:
        cr = {k: np.zeros(0) for k in ("month", "admin2", "event_type", "events", "fatalities")}
    cr["month"] = cr["month"].astype(np.int64)
    fat_month = np.bincount(cr["month"], cr["fatalities"], minlength=n_months)
    ev_month = np.bincount(cr["month"], cr["events"], minlength=n_months)

    s_lo, s_hi = sentinel_months or ((3, 34) if not learn else (3, n_months - 1))
    monthly: Dict[str, SourceTable] = {}
    for name in m_names:
        x = np.full((n_months, 0), np.nan)
        if name == "sentinel":
            cloud = np.clip(57 + 30 * np.cos(2 * np.pi * moy / 12) + rng.normal(0, 8, n_months), 20, 94)
            co = rng.poisson(85, n_months) * (rng.random(n_months) > 0.15)
            x = np.stack([rng.poisson(38, n_months), rng.poisson(170, n_months), rng.poisson(125, n_months), co,
                          rng.poisson(200, n_months), cloud,
                          np.maximum(2, rng.poisson(np.maximum(1, 140 * (1 - cloud / 100))))], 1).astype(float)
            cov = (np.arange(n_months) >= s_lo) & (np.arange(n_months) <= s_hi)
            x[~cov] = np.nan
            fn = ("s1_radar", "s2_optical", "s3_fire", "s5p_co", "s5p_no2", "s2_avg_cloud", "s2_cloud_free")
        elif name == "hdx_conflict":
            fat_in = fat_month if casualty_leakage else np.concatenate([[np.nan], fat_month[:-1]])
            ev_type = np.stack([np.bincount(cr["month"][cr["event_type"] == k], cr["events"][cr["event_type"] == k],
                                            minlength=n_months) for k in range(3)], 1)
            x = np.column_stack([ev_month, fat_in, ev_type]).astype(float)
            x[~present] = np.nan
            fn = ("events", "fatalities") + _EVENT_TYPES
        elif name == "hdx_food":
            price = 20 * 1.012 ** np.arange(n_months) * np.exp(rng.normal(0, 0.05, n_months))
            cnt = rng.poisson(30, n_months) + 1.0
            cnt[rng.random(n_months) < 0.08] = 1.0
            std = np.where(cnt > 1, price * rng.uniform(0.1, 0.3, n_months), np.nan)  # single record -> NaN std
            com = price[:, None] * np.array([0.5, 0.8, 0.4, 2.5, 1.1]) * np.exp(rng.normal(0, 0.05, (n_months, 5)))
            com[rng.random(com.shape) < 0.1] = np.nan
            x = np.column_stack([price, std, price * 0.6, price * 1.6, cnt, com])
            fn = ("price_mean", "price_std", "price_min", "price_max", "price_count") + tuple(f"price_{c}" for c in _FOOD)
        elif name == "hdx_rainfall":
            lta = 50 + 25 * np.sin(2 * np.pi * (moy - 3) / 12)
            mean = lta + rng.normal(0, 8, n_months)
            x = np.column_stack([mean, np.abs(rng.normal(15, 3, n_months)), mean * 0.3, mean * 2.2, lta, mean - lta])
            fn = ("rainfall_mean", "rainfall_std", "rainfall_min", "rainfall_max", "rainfall_lta", "rainfall_anomaly")
        elif name == "iom":
            x = np.full((n_months, 7), np.nan)
            m, r = int(rng.integers(0, 2)), 1
            while m < n_months:
                tot = 7e6 * np.exp(-m / 60) * np.exp(rng.normal(0, 0.05))
                fr = rng.uniform(0.55, 0.6)
                x[m] = [tot, tot / 24, tot / 6, tot * (1 - fr), tot * fr, r, fr]
                m += int(rng.integers(1, 4))
                r += 1
            fn = ("idp_total", "idp_mean", "idp_max", "idp_males", "idp_females", "round_number", "idp_female_ratio")
        else:
            raise DataError(f"synthetic monthly source '{name}' is unknown; expected one of "
                            f"{[s for s, _ in MONTHLY_SOURCES]}")
        monthly[name] = SourceTable(name, mstarts, x, fn, "synthetic")

    # 6. VIIRS tiles -> daily mean radiance -> anomaly targets.
    end_v = np.datetime64(viirs_end, "D") if viirs_end else (np.datetime64("2024-12-31") if not learn else dates[-1])
    sm = np.convolve(log_lam - trend, np.ones(14) / 14, mode="same")
    peaks = np.flatnonzero((sm > np.quantile(sm, 0.9)) & (sm >= np.roll(sm, 1)) & (sm >= np.roll(sm, -1)))
    dip = np.zeros(n)
    for p in peaks:
        s0 = p + 10  # VIIRS lags conflict by ~10 days
        dip[s0 : s0 + int(rng.integers(7, 22))] = np.log(1 - rng.uniform(0.2, 0.5))
    season = 0.1 * np.sin(2 * np.pi * t / 365.25) + 0.15 * np.cos(2 * np.pi * t / 29.5)
    tiles = np.log(5.0) + season[:, None] + dip[:, None] + rng.normal(0, 0.3, 6)[None, :] + rng.normal(0, 0.05, (n, 6))
    cloud_d = np.clip(0.5 + 0.3 * np.cos(2 * np.pi * (t + 54) / 365.25) + rng.normal(0, 0.2, n), 0, 1)
    day_missing = rng.random(n) < 0.3 * cloud_d  # cloud-driven MNAR gaps, ~15 % of days
    tile_missing = rng.random((n, 6)) < 0.05
    rad = np.where(tile_missing, np.nan, np.exp(tiles))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-tiles-missing days -> NaN
        daily_rad = np.nanmean(rad, axis=1)
    daily_rad[day_missing | (dates > end_v)] = np.nan
    anomaly, a_valid = fe.viirs_anomaly(daily_rad)

    day_t = DayTargets(dates, phase, np.ones(n, bool), trans, anomaly.astype(np.float32), a_valid, n_active)
    month_t = MonthTargets(mstarts, fat_month.astype(np.float64), present.copy())
    note(report, f"synthetic world: seed={seed} mode={mode} preset={preset} {n} days from {start}; "
                 f"{int(trans[1:].sum())} transitions; daily {list(d_names)}; monthly {list(m_names)}")
    extras = dict(intensity=lam, phase=phase, conflict_rows=cr, viirs_daily_radiance=daily_rad,
                  increments=inc, mode=mode)
    return World(daily, monthly, day_t, month_t, name=f"synthetic-{mode}-{preset}-seed{seed}", report=report,
                 extras=extras)
