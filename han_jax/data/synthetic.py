"""Deterministic synthetic world following docs/data.md section 7 (an offline stand-in for the real sources).

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
    equipment mix, growth that stops half-way, no monthly series that only
    rises or falls (a clock the model memorises training months by), and
    sentinel/VIIRS coverage to the end, so accuracy and the
    anomaly loss can be measured on val/test. This deliberately departs from the
    original's data to make evaluation meaningful.

``make_synthetic_world`` runs these stages in order (each a function below):

  1. ``resolve_spec``          arguments + preset -> ``SyntheticSpec`` (days, source names)
  2. ``regime_timeline``       -> ``Regimes``: per-day phase, transitions, active operations
  3. ``latent_drivers``        -> ``Drivers``: conflict intensity and per-phase equipment mix
  4. ``loss_counters``         -> ``Counters``: daily increments and cumulative loss counters
  5. ``daily_source_tables``   -> the daily ``SourceTable``s (delta features of the counters)
  6. ``month_axis``            -> ``MonthAxis``: the months the days span
  7. ``conflict_events``       -> ``ConflictEvents``: conflict rows and their monthly totals
  8. ``monthly_source_tables`` -> the monthly ``SourceTable``s
  9. ``viirs_radiance``        -> daily mean night-light radiance (NaN = no observation)
 10. ``day_targets`` / ``month_targets`` -> the target tables

Stages 2, 3, 4, 7, 8 and 9 draw from one ``numpy.random.Generator`` in that
order; the order (and the order of draws inside each stage) is part of what a
seed means, so reordering them changes every array.
"""

from __future__ import annotations

import dataclasses
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

# The real timeline's segments (phase, days) before the absorbing Kursk phase (docs/data.md 5.2).
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
_N_ADMIN = 133  # admin-2 areas in the conflict rows
_CONFLICT_FIELDS = ("month", "admin2", "event_type", "events", "fatalities")


# --- stage results ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: the resolved arguments of ``make_synthetic_world``."""

    seed: int
    mode: str  # "learnable" | "realistic"
    preset: str
    start: str
    dates: np.ndarray  # datetime64[D] [n], consecutive days from ``start``
    daily_names: Tuple[str, ...]
    monthly_names: Tuple[str, ...]

    @property
    def n_days(self) -> int:
        return len(self.dates)

    @property
    def learnable(self) -> bool:
        return self.mode == "learnable"


@dataclasses.dataclass(frozen=True)
class Regimes:
    """Per-day regime labels: phase index, transition flag, number of active operations."""

    phase: np.ndarray  # int32 [n]
    is_transition: np.ndarray  # bool [n]; day 0 counts as a transition
    n_active: np.ndarray  # int32 [n]


@dataclasses.dataclass(frozen=True)
class Drivers:
    """The latent state every observed series is drawn from."""

    trend: np.ndarray  # float64 [n], log scale
    log_intensity: np.ndarray  # float64 [n]: trend + regime effect + AR(1) noise + shocks
    intensity: np.ndarray  # float64 [n], exp(log_intensity): expected personnel losses per day
    equipment_mix: np.ndarray  # float64 [11 phases, len(_TYPE_ORDER)]: each regime's fingerprint
    growth_time: np.ndarray  # float64 [n]: the day count the secular growth (trend, drones) has reached


@dataclasses.dataclass(frozen=True)
class Counters:
    """Loss counters on days 1..n-1 (day 0 is unobserved, as in the real source)."""

    increments: Dict[str, np.ndarray]  # per counter, daily increments before corrections
    cumulative: Dict[str, np.ndarray]  # per counter, cumulative counts with NaN reporting gaps


@dataclasses.dataclass(frozen=True)
class MonthAxis:
    """The calendar months the days touch."""

    months: np.ndarray  # datetime64[M] [n_months]
    month_starts: np.ndarray  # datetime64[D] [n_months]
    month_of_day: np.ndarray  # int64 [n], index into ``months``
    month_of_year: np.ndarray  # int64 [n_months], 0 = January

    @property
    def n_months(self) -> int:
        return len(self.months)


@dataclasses.dataclass(frozen=True)
class ConflictEvents:
    """Conflict rows (month x admin-2 area x event type) and their monthly totals."""

    rows: Dict[str, np.ndarray]  # _CONFLICT_FIELDS -> flat arrays, one entry per row
    present: np.ndarray  # bool [n_months]: the month has rows at all
    events: np.ndarray  # float64 [n_months]
    fatalities: np.ndarray  # float64 [n_months]


# --- the generator ------------------------------------------------------------------------------------


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
    spec = resolve_spec(seed, mode, preset, n_days=n_days, start=start,
                        daily_sources=daily_sources, monthly_sources=monthly_sources)
    rng = np.random.default_rng([int(spec.seed), 1 if spec.learnable else 0])

    regimes = regime_timeline(rng, spec.n_days, learnable=spec.learnable)
    drivers = latent_drivers(rng, regimes.phase, learnable=spec.learnable)
    counters = loss_counters(rng, regimes.phase, drivers)
    daily = daily_source_tables(spec.daily_names, spec.dates[1:], counters)
    months = month_axis(spec.dates)
    conflict = conflict_events(rng, drivers.intensity, months, missing_months=missing_casualty_months)
    monthly = monthly_source_tables(
        rng, spec.monthly_names, months, conflict,
        learnable=spec.learnable, sentinel_months=sentinel_months, casualty_leakage=casualty_leakage,
    )
    radiance = viirs_radiance(rng, drivers, spec.dates, learnable=spec.learnable, viirs_end=viirs_end)
    day_t = day_targets(spec.dates, regimes, radiance)
    month_t = month_targets(months, conflict)

    report = []
    note(report, f"synthetic world: seed={spec.seed} mode={spec.mode} preset={spec.preset} {spec.n_days} days "
                 f"from {spec.start}; {int(regimes.is_transition[1:].sum())} transitions; "
                 f"daily {list(spec.daily_names)}; monthly {list(spec.monthly_names)}")
    extras = dict(intensity=drivers.intensity, phase=regimes.phase, conflict_rows=conflict.rows,
                  viirs_daily_radiance=radiance, increments=counters.increments, mode=spec.mode)
    return World(daily, monthly, day_t, month_t, name=f"synthetic-{spec.mode}-{spec.preset}-seed{spec.seed}",
                 report=report, extras=extras)


# --- 1. spec ------------------------------------------------------------------------------------------


def resolve_spec(
    seed: int,
    mode: str,
    preset: str,
    *,
    n_days: Optional[int],
    start: str,
    daily_sources: Optional[Sequence[str]],
    monthly_sources: Optional[Sequence[str]],
) -> SyntheticSpec:
    """Check mode / preset / length and fill the preset's defaults; returns the ``SyntheticSpec``.

    Source names are checked later, by the stage that generates them.
    """
    if mode not in ("learnable", "realistic"):
        raise DataError(f"synthetic mode '{mode}'; expected 'learnable' or 'realistic'")
    if preset not in PRESETS:
        raise DataError(f"synthetic preset '{preset}'; expected one of {list(PRESETS)}")
    pre = PRESETS[preset]
    n = int(n_days or pre["n_days"])
    if n < 40:
        raise DataError(f"synthetic n_days={n}; expected >= 40")
    return SyntheticSpec(
        seed=seed,
        mode=mode,
        preset=preset,
        start=start,
        dates=np.datetime64(start, "D") + np.arange(n),
        daily_names=tuple(daily_sources or [s for s, _ in pre["daily"]]),
        monthly_names=tuple(monthly_sources or [s for s, _ in pre["monthly"]]),
    )


# --- 2. regimes ---------------------------------------------------------------------------------------


def regime_timeline(rng: np.random.Generator, n: int, *, learnable: bool) -> Regimes:
    """The per-day regime chain over ``n`` days (learnable: semi-Markov; realistic: the real shape)."""
    if learnable:
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
    return Regimes(phase, trans, n_active)


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


# --- 3. latent drivers --------------------------------------------------------------------------------


def latent_drivers(rng: np.random.Generator, phase: np.ndarray, *, learnable: bool) -> Drivers:
    """Intensity (rising trend + regime effect + AR(1) + decaying shocks) and the per-phase equipment mix."""
    n = len(phase)
    t = np.arange(n, dtype=np.float64)
    # Learnable: the secular growth stops half-way, so val and test (the last 30 %)
    # lie in the range the training split covers. Growth that runs on into them
    # put val/test inputs 2.4-4.5 train standard deviations out, and the model,
    # which cannot extrapolate a level it never saw, read the level as a clock:
    # it predicted the class it had seen last in training (val balanced accuracy
    # 0.02-0.15 while training accuracy rose). The realistic world keeps the
    # original's growth; han-jax's count transform (DataConfig.count_transform)
    # is the answer offered there.
    growth = np.minimum(t, 0.5 * n) if learnable else t
    trend = np.log(240.0) + np.log(6.0) * np.clip((growth - 130.0) / 870.0, -0.2, 1.15)
    if learnable:
        # One intensity level per coarse class. Class 3 holds the baseline (quiet)
        # phase, so it is the lowest; the earlier world gave the baseline -0.2 and
        # its class-mates +0.4, a class with two levels, which the model learnt
        # as two classes.
        eff_phase = np.array([0.2, 0.4, -0.1, -0.35])[np.asarray(PHASE_TO_COARSE)] + rng.normal(0, 0.05, 11)
        mix_sigma = 0.45
        # Slow AR(1) drift, stationary std 0.06, well below the 0.2-0.3 gaps between class
        # levels. At 0.05 (std 0.2) a 215-day val split caught an upward excursion that put
        # every class ~0.4 above its training level, and the model called classes 2 and 3
        # class 1 (the highest level): val regime balanced accuracy 0.16 with test at 0.75.
        level_noise = 0.015
    else:
        eff_phase = rng.normal(0, 0.15, 11)
        eff_phase[BASELINE] = -0.2
        mix_sigma = 0.1
        level_noise = 0.08
    noise = np.zeros(n)
    fast = np.zeros(n)  # short-memory part: what makes the 7-day drone lead visible over the shared trend
    shock = np.zeros(n)
    eps = rng.normal(0, level_noise, n)
    eps_fast = rng.normal(0, 0.25, n)
    hits = rng.random(n) < 0.004
    mags = rng.uniform(0.3, 0.8, n)
    for i in range(1, n):
        noise[i] = 0.97 * noise[i - 1] + eps[i]
        fast[i] = 0.5 * fast[i - 1] + eps_fast[i]
        shock[i] = 0.8 * shock[i - 1] + (mags[i] if hits[i] else 0.0)
    log_lam = trend + eff_phase[phase] + noise + fast + shock
    if learnable:
        # One fingerprint per coarse class, shared by its phases (plus a small
        # per-phase part): a class is then recognisable in val/test segments.
        # Independent per-phase mixes (the earlier world) gave a class no common
        # signature, so the model had to memorise each fine phase from the one to
        # three segments the training split holds of it, and it predicted a single
        # class on val and test (regime balanced accuracy 0.333 = majority).
        by_class = rng.normal(0, mix_sigma, (4, len(_TYPE_ORDER)))
        own = rng.normal(0, 0.1, (11, len(_TYPE_ORDER)))
        mix = np.exp(by_class[np.asarray(PHASE_TO_COARSE)] + own)
    else:
        mix = np.exp(rng.normal(0, mix_sigma, (11, len(_TYPE_ORDER))))
    return Drivers(trend=trend, log_intensity=log_lam, intensity=np.exp(log_lam), equipment_mix=mix,
                   growth_time=growth)


# --- 4-5. daily sources -------------------------------------------------------------------------------


def loss_counters(rng: np.random.Generator, phase: np.ndarray, drivers: Drivers) -> Counters:
    """Cumulative personnel / POW / equipment counters on days 1..n-1.

    Overdispersed counts around the intensity (zero-inflated rare types, drones
    leading personnel by 7 days), 1 % reporting gaps, rare negative corrections,
    POW only for the first ~2 months and a late SRBM column.
    """
    lam = drivers.intensity
    n = len(lam)
    gaps = rng.random(n - 1) < 0.01
    corr = rng.random(n - 1) < 0.002
    inc = {"personnel": _nb(rng, lam[1:], 5.0)}
    inc["POW"] = _nb(rng, 0.02 * lam[1:], 1.0)
    lam_lead = np.concatenate([lam[7:], np.full(7, lam[-1])])  # drones lead personnel by ~7 days
    for j, k in enumerate(_TYPE_ORDER):
        m = drivers.equipment_mix[phase[1:], j]
        if k in _NB_TYPES:
            w, theta = _NB_TYPES[k]
            base = lam_lead[1:] * (1 + drivers.growth_time[1:] / 250.0) ** 1.5 if k == "drone" else lam[1:]
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
    return Counters(increments=inc, cumulative=cum)


def daily_source_tables(names: Sequence[str], dates: np.ndarray, counters: Counters) -> Dict[str, SourceTable]:
    """The named daily sources (the loaders' delta features of the counters) on ``dates``, in ``names`` order."""
    cum = counters.cumulative
    daily: Dict[str, SourceTable] = {}
    for name in names:
        if name == "personnel":
            vals, fnames = fe.personnel_features(cum["personnel"], cum["POW"]), fe.PERSONNEL_FEATURES
        elif name in fe.EQUIPMENT_SOURCES:
            cols, _ = fe.EQUIPMENT_SOURCES[name]
            vals, fnames = fe.equipment_features([cum[c] for c in cols]), fe.equipment_feature_names(name)
        else:
            raise DataError(f"synthetic daily source '{name}' is unknown; expected one of "
                            f"{['personnel'] + list(fe.EQUIPMENT_SOURCES)}")
        daily[name] = SourceTable(name, dates, vals, tuple(fnames), "synthetic")
    return daily


# --- 6-8. monthly sources -----------------------------------------------------------------------------


def month_axis(dates: np.ndarray) -> MonthAxis:
    """The months from the first day's to the last day's, and each day's month index."""
    months_m = np.arange(dates[0].astype("datetime64[M]"), dates[-1].astype("datetime64[M]") + 1)
    return MonthAxis(
        months=months_m,
        month_starts=months_m.astype("datetime64[D]"),
        month_of_day=(dates.astype("datetime64[M]") - months_m[0]).astype(np.int64),
        month_of_year=(months_m.astype(np.int64) % 12),
    )


def conflict_events(
    rng: np.random.Generator, intensity: np.ndarray, months: MonthAxis, *, missing_months: Sequence[int]
) -> ConflictEvents:
    """Zero-inflated conflict rows per month / admin-2 area / event type, following the monthly intensity.

    Months listed in ``missing_months`` get no rows (``present`` False).
    """
    n_months = months.n_months
    lam_month = np.bincount(months.month_of_day, intensity) / np.bincount(months.month_of_day)
    present = np.ones(n_months, bool)
    for m in missing_months:
        if 0 <= m < n_months:
            present[m] = False

    n_admin = _N_ADMIN
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
        cr = {k: np.concatenate([r[i].ravel() for r in rows]) for i, k in enumerate(_CONFLICT_FIELDS)}
    else:
        cr = {k: np.zeros(0) for k in _CONFLICT_FIELDS}
    cr["month"] = cr["month"].astype(np.int64)
    return ConflictEvents(
        rows=cr,
        present=present,
        events=np.bincount(cr["month"], cr["events"], minlength=n_months),
        fatalities=np.bincount(cr["month"], cr["fatalities"], minlength=n_months),
    )


def monthly_source_tables(
    rng: np.random.Generator,
    names: Sequence[str],
    months: MonthAxis,
    conflict: ConflictEvents,
    *,
    learnable: bool,
    sentinel_months: Optional[Tuple[int, int]],
    casualty_leakage: bool,
) -> Dict[str, SourceTable]:
    """The named monthly sources on the month starts, in ``names`` order.

    ``sentinel_months`` (first, last month index) defaults to 3..34 (realistic)
    or 3..the last month (learnable); ``casualty_leakage`` as in ``make_synthetic_world``.
    """
    n_months = months.n_months
    s_lo, s_hi = sentinel_months or ((3, 34) if not learnable else (3, n_months - 1))
    monthly: Dict[str, SourceTable] = {}
    for name in names:
        if name == "sentinel":
            x, fn = _sentinel(rng, months, s_lo, s_hi)
        elif name == "hdx_conflict":
            x, fn = _hdx_conflict(months, conflict, casualty_leakage)
        elif name == "hdx_food":
            x, fn = _hdx_food(rng, months, inflation=1.0 if learnable else 1.012)
        elif name == "hdx_rainfall":
            x, fn = _hdx_rainfall(rng, months)
        elif name == "iom":
            x, fn = _iom(rng, months, learnable=learnable)
        else:
            raise DataError(f"synthetic monthly source '{name}' is unknown; expected one of "
                            f"{[s for s, _ in MONTHLY_SOURCES]}")
        monthly[name] = SourceTable(name, months.month_starts, x, fn, "synthetic")
    return monthly


def _sentinel(rng, months: MonthAxis, s_lo: int, s_hi: int):
    """Satellite activity counts and cloud cover, observed only in months ``s_lo..s_hi``."""
    n_months, moy = months.n_months, months.month_of_year
    cloud = np.clip(57 + 30 * np.cos(2 * np.pi * moy / 12) + rng.normal(0, 8, n_months), 20, 94)
    co = rng.poisson(85, n_months) * (rng.random(n_months) > 0.15)
    x = np.stack([rng.poisson(38, n_months), rng.poisson(170, n_months), rng.poisson(125, n_months), co,
                  rng.poisson(200, n_months), cloud,
                  np.maximum(2, rng.poisson(np.maximum(1, 140 * (1 - cloud / 100))))], 1).astype(float)
    cov = (np.arange(n_months) >= s_lo) & (np.arange(n_months) <= s_hi)
    x[~cov] = np.nan
    return x, ("s1_radar", "s2_optical", "s3_fire", "s5p_co", "s5p_no2", "s2_avg_cloud", "s2_cloud_free")


def _hdx_conflict(months: MonthAxis, conflict: ConflictEvents, casualty_leakage: bool):
    """Monthly event / fatality totals of the conflict rows (no draws); missing where a month has no rows."""
    n_months = months.n_months
    cr = conflict.rows
    fat_in = conflict.fatalities if casualty_leakage else np.concatenate([[np.nan], conflict.fatalities[:-1]])
    ev_type = np.stack([np.bincount(cr["month"][cr["event_type"] == k], cr["events"][cr["event_type"] == k],
                                    minlength=n_months) for k in range(3)], 1)
    x = np.column_stack([conflict.events, fat_in, ev_type]).astype(float)
    x[~conflict.present] = np.nan
    return x, ("events", "fatalities") + _EVENT_TYPES


def _hdx_food(rng, months: MonthAxis, *, inflation: float):
    """Food prices (``inflation`` per month) with per-commodity gaps (a single record gives a NaN std)."""
    n_months = months.n_months
    price = 20 * inflation ** np.arange(n_months) * np.exp(rng.normal(0, 0.05, n_months))
    cnt = rng.poisson(30, n_months) + 1.0
    cnt[rng.random(n_months) < 0.08] = 1.0
    std = np.where(cnt > 1, price * rng.uniform(0.1, 0.3, n_months), np.nan)  # single record -> NaN std
    com = price[:, None] * np.array([0.5, 0.8, 0.4, 2.5, 1.1]) * np.exp(rng.normal(0, 0.05, (n_months, 5)))
    com[rng.random(com.shape) < 0.1] = np.nan
    x = np.column_stack([price, std, price * 0.6, price * 1.6, cnt, com])
    return x, ("price_mean", "price_std", "price_min", "price_max", "price_count") + tuple(f"price_{c}" for c in _FOOD)


def _hdx_rainfall(rng, months: MonthAxis):
    """Seasonal rainfall around its long-term average."""
    n_months, moy = months.n_months, months.month_of_year
    lta = 50 + 25 * np.sin(2 * np.pi * (moy - 3) / 12)
    mean = lta + rng.normal(0, 8, n_months)
    x = np.column_stack([mean, np.abs(rng.normal(15, 3, n_months)), mean * 0.3, mean * 2.2, lta, mean - lta])
    return x, ("rainfall_mean", "rainfall_std", "rainfall_min", "rainfall_max", "rainfall_lta", "rainfall_anomaly")


def _iom(rng, months: MonthAxis, *, learnable: bool):
    """Displacement survey rounds every 1-3 months (missing between rounds).

    Realistic: IDP totals decay and rounds are numbered from 1. Learnable: totals
    stay level and a round carries its quarter of the year, so no input is a clock.
    """
    n_months = months.n_months
    x = np.full((n_months, 7), np.nan)
    m, r = int(rng.integers(0, 2)), 1
    while m < n_months:
        tot = 7e6 * np.exp(-(0 if learnable else m) / 60) * np.exp(rng.normal(0, 0.05))
        fr = rng.uniform(0.55, 0.6)
        number = 1 + months.month_of_year[m] // 3 if learnable else r  # learnable: the quarter
        x[m] = [tot, tot / 24, tot / 6, tot * (1 - fr), tot * fr, number, fr]
        m += int(rng.integers(1, 4))
        r += 1
    return x, ("idp_total", "idp_mean", "idp_max", "idp_males", "idp_females", "round_number", "idp_female_ratio")


# --- 9-10. VIIRS and targets --------------------------------------------------------------------------


def viirs_radiance(
    rng: np.random.Generator, drivers: Drivers, dates: np.ndarray, *, learnable: bool, viirs_end: Optional[str]
) -> np.ndarray:
    """Daily mean radiance of 6 VIIRS tiles (float64 [n], NaN = no observation).

    Seasonal radiance with dips lagging intensity peaks by ~10 days, tile noise,
    cloud-driven missing days and missing tiles; no observations after
    ``viirs_end`` (default: 2024-12-31 realistic, the last day learnable).
    """
    n = len(dates)
    t = np.arange(n, dtype=np.float64)
    default_end = np.datetime64("2024-12-31") if not learnable else dates[-1]
    end_v = np.datetime64(viirs_end, "D") if viirs_end else default_end
    sm = np.convolve(drivers.log_intensity - drivers.trend, np.ones(14) / 14, mode="same")
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
    return daily_rad


def day_targets(dates: np.ndarray, regimes: Regimes, radiance: np.ndarray) -> DayTargets:
    """Per-day targets: every day's phase is valid; the anomaly is the VIIRS z-score where observed."""
    anomaly, a_valid = fe.viirs_anomaly(radiance)
    n = len(dates)
    return DayTargets(dates, regimes.phase, np.ones(n, bool), regimes.is_transition, anomaly.astype(np.float32),
                      a_valid, regimes.n_active)


def month_targets(months: MonthAxis, conflict: ConflictEvents) -> MonthTargets:
    """Per-month casualty targets: conflict fatalities, valid where the month has conflict rows."""
    return MonthTargets(months.month_starts, conflict.fatalities.astype(np.float64), conflict.present.copy())


def _nb(rng, mean, theta):
    """Negative-binomial counts with the given mean and dispersion (gamma-Poisson)."""
    mean = np.maximum(np.asarray(mean, np.float64), 1e-9)
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float64)
