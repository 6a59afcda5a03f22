"""Calendar alignment, masks, train-only normalisation, anchors, splits and per-anchor targets.

``build_datasets(world, config)`` runs the original's ``MultiResolutionDataset``
steps (data.md sections 1.4, 2, 4, 5) once for all three splits and returns
precomputed arrays; windows are gathered per batch by ``iterate_batches``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from han_jax.data.config import DataConfig
from han_jax.data.world import DataError, SourceTable, World, note, to_day

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


@dataclasses.dataclass
class NormStats:
    """Train-only per-feature statistics, per source (std already floored)."""

    mean: Dict[str, np.ndarray]
    std: Dict[str, np.ndarray]


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
    store: "ArrayStore"

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def daily_sources(self) -> Layout:
        return self.store.daily_sources

    @property
    def monthly_sources(self) -> Layout:
        return self.store.monthly_sources


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
class Datasets:
    train: SplitData
    val: SplitData
    test: SplitData
    stats: NormStats
    calendar: Calendar
    daily_sources: Layout
    monthly_sources: Layout
    config: DataConfig
    info: dict
    report: List[str]

    @property
    def splits(self) -> Dict[str, SplitData]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def model_layout(self) -> dict:
        """``ModelConfig`` keyword arguments for this data's source layout."""
        return {"daily_sources": self.daily_sources, "monthly_sources": self.monthly_sources}


# ---------------------------------------------------------------------------


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


def _fit_stats(x: np.ndarray, rows: np.ndarray, floor: float) -> Tuple[np.ndarray, np.ndarray]:
    """nanmean / nanstd (ddof=0) over the selected rows; all-NaN -> (0, 1); std floored."""
    sel = x[rows]
    f = x.shape[1]
    if sel.shape[0] == 0:
        return np.zeros(f), np.maximum(np.ones(f), floor)
    cnt = np.sum(~np.isnan(sel), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(sel, axis=0) / cnt
        var = np.nansum((sel - mean) ** 2, axis=0) / cnt
    mean = np.where(cnt > 0, mean, 0.0)
    std = np.where(cnt > 0, np.sqrt(var), 1.0)
    return mean, np.maximum(std, floor)


def _normalise(x: np.ndarray, row_mask: np.ndarray, mean, std, missing: float):
    z = ((x - mean) / std).astype(np.float32)
    z = np.where(np.isnan(z), np.float32(missing), z)
    mask = row_mask[:, None] & (z != missing)
    return z, mask


def _auto_stride(n_valid: int, daily_seq_len: int) -> int:
    """The original's automatic val/test stride: the largest s <= T//2 keeping min(10, n) samples."""
    min_samples = min(10, n_valid)
    for s in range(max(1, daily_seq_len // 2), 0, -1):
        if -(-n_valid // s) >= min_samples:
            return s
    return 1


def build_datasets(world: World, config: DataConfig = DataConfig()) -> Datasets:
    """Align, mask, normalise (train-only), anchor and split a world.

    Deliberate differences from the original: bad inputs raise ``DataError``
    instead of warning, and ``embargo_days`` (default 0, i.e. the original) can
    drop that many anchor days at the start of val and of test.
    """
    cfg = config
    world.validate()
    report = list(world.report)
    d_names = _resolve_sources("daily", cfg.daily_sources, world.daily)
    m_names = _resolve_sources("monthly", cfg.monthly_sources, world.monthly)
    if not d_names:
        raise DataError("no daily sources selected; expected at least one")
    if cfg.prediction_horizon < 1:
        raise DataError(f"prediction_horizon={cfg.prediction_horizon}; expected >= 1")

    # --- calendar (data.md 1.4): start = max(config start, earliest date), end = latest date.
    all_dates = [np.asarray(world.daily[n].dates, "datetime64[D]") for n in d_names]
    all_dates += [np.asarray(world.monthly[n].dates, "datetime64[D]") for n in m_names]
    lo = min(d.min() for d in all_dates)
    hi = max(d.max() for d in all_dates)
    start = max(to_day(cfg.start_date), lo)
    end = min(to_day(cfg.end_date), hi) if cfg.end_date else hi
    cal = make_calendar(start, end)
    T, M, n_days, n_months = cfg.daily_seq_len, cfg.monthly_seq_len, cal.n_days, cal.n_months
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

    # --- splits over day indices (data.md 4).
    n_test = max(1, int(n_days * cfg.test_ratio))
    n_val = max(1, int(n_days * cfg.val_ratio))
    train_end = n_days - n_test - n_val
    val_end = train_end + n_val
    if train_end <= 0:
        raise DataError(f"val_ratio={cfg.val_ratio} + test_ratio={cfg.test_ratio} leave no train days of {n_days}")
    ranges = {
        "train": (0, train_end),
        "val": (min(train_end + cfg.embargo_days, val_end), val_end),
        "test": (min(val_end + cfg.embargo_days, n_days), n_days),
    }

    # --- realign; masks recomputed from the data as in _realign_sources.
    raw_d = {n: _reindex(world.daily[n], cal.start, n_days, False) for n in d_names}
    raw_m = {n: _reindex(world.monthly[n], cal.start, n_months, True) for n in m_names}
    row_d = {n: ~np.all(np.isnan(x), axis=1) for n, x in raw_d.items()}
    row_m = {n: ~np.all(np.isnan(x), axis=1) for n, x in raw_m.items()}

    # --- train-only statistics (data.md 2, "Normalization").
    train_months = np.unique(cal.month_of_day[:train_end])
    if cfg.norm_whole_train_months:
        # Quirk kept: every day of every month touched by train, so up to ~30 val days leak in.
        day_rows = np.isin(cal.month_of_day, train_months)
        month_rows = np.arange(n_months) < len(train_months)
    else:
        day_rows = np.arange(n_days) < train_end
        month_rows = cal.month_bounds[:, 1] <= train_end
    mean, std = {}, {}
    store_d, mask_d, store_m, mask_m = {}, {}, {}, {}
    for n, x in raw_d.items():
        mean[n], std[n] = _fit_stats(x, day_rows & row_d[n], cfg.std_floor)
        store_d[n], mask_d[n] = _normalise(x, row_d[n], mean[n], std[n], cfg.missing_value)
    for n, x in raw_m.items():
        mean[n], std[n] = _fit_stats(x, month_rows & row_m[n], cfg.std_floor)
        store_m[n], mask_m[n] = _normalise(x, row_m[n], mean[n], std[n], cfg.missing_value)
    stats = NormStats(mean, std)

    d_layout = tuple((n, world.daily[n].n_features) for n in d_names)
    m_layout = tuple((n, world.monthly[n].n_features) for n in m_names)
    store = ArrayStore(
        store_d, mask_d, store_m, mask_m, d_layout, m_layout, T, M, cfg.missing_value,
        cfg.daily_forecast_horizon if cfg.daily_forecast_targets else None,
    )

    # --- per-month forecast table: monthly sources first, then monthly means of daily ones.
    fc_vals, fc_masks = [], []
    for n in m_names:
        fc_vals.append(np.where(mask_m[n], store_m[n], 0.0))
        fc_masks.append(mask_m[n])
    lo_b, hi_b = cal.month_bounds[:, 0], cal.month_bounds[:, 1]
    for n in d_names:
        m = mask_d[n]
        v = np.where(m, store_d[n], 0.0).astype(np.float64)
        cs_v = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
        cs_c = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(m, axis=0)])
        s = cs_v[hi_b] - cs_v[lo_b]
        c = cs_c[hi_b] - cs_c[lo_b]
        with np.errstate(invalid="ignore", divide="ignore"):
            agg = np.where(c > 0, s / np.maximum(c, 1), 0.0)
        fc_vals.append(agg.astype(np.float32))
        fc_masks.append(c > 0)
    fc_table = np.concatenate(fc_vals, axis=1).astype(np.float32)
    fc_mask_table = np.concatenate(fc_masks, axis=1)

    # --- per-day / per-month target tables on the calendar.
    tg = _target_tables(world, cal)

    # --- anchors per split.
    all_days = np.arange(n_days)
    ok = (all_days - T + 1 >= 0) & (cal.month_of_day - M + 1 >= 0) & (cal.month_of_day + cfg.prediction_horizon <= n_months)
    splits = {}
    for name, (a, b) in ranges.items():
        valid = all_days[a:b][ok[a:b]]
        stride = 1
        if name != "train" and len(valid) > 1:
            stride = cfg.val_sample_stride or _auto_stride(len(valid), T)
            valid = valid[::stride]
        if len(valid) == 0:
            raise DataError(
                f"split '{name}' has no valid anchors: its days {a}..{b - 1} of {n_days} "
                f"({cal.start}..{cal.end}) cannot hold a window of daily_seq_len={T} days and "
                f"monthly_seq_len={M} months; expected more data or shorter windows"
            )
        splits[name] = _make_split(name, valid, stride, (a, b), cal, cfg, store, tg, fc_table, fc_mask_table)

    info = {
        "n_days": n_days,
        "n_months": n_months,
        "start": str(cal.start),
        "end": str(cal.end),
        "split_days": {k: (int(a), int(b)) for k, (a, b) in ranges.items()},
        "split_dates": {
            k: (str(cal.day_dates[a]) if a < n_days else None, str(cal.day_dates[b - 1]) if b > a else None)
            for k, (a, b) in ranges.items()
        },
        "anchors": {k: len(s) for k, s in splits.items()},
        "stride": {k: s.stride for k, s in splits.items()},
        "daily_sources": d_layout,
        "monthly_sources": m_layout,
        "world": world.name,
    }
    note(
        report,
        f"datasets from '{world.name}': {n_days} days / {n_months} months ({cal.start}..{cal.end}); "
        f"anchors train={len(splits['train'])} val={len(splits['val'])} (stride {splits['val'].stride}) "
        f"test={len(splits['test'])} (stride {splits['test'].stride})",
    )
    return Datasets(splits["train"], splits["val"], splits["test"], stats, cal, d_layout, m_layout, cfg, info, report)


def _target_tables(world: World, cal: Calendar) -> Dict[str, np.ndarray]:
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


def _make_split(name, anchors, stride, day_range, cal, cfg, store, tg, fc_table, fc_mask_table) -> SplitData:
    T, M, h = cfg.daily_seq_len, cfg.monthly_seq_len, cfg.prediction_horizon
    anchors = np.asarray(anchors, np.int64)
    am = cal.month_of_day[anchors]
    months = am[:, None] + np.arange(-M + 1, 1)[None, :]  # [N, M]
    # Month boundaries relative to the window, clipped to [0, T] with start <= end.
    dstart = anchors - T + 1
    inside = (months >= 0) & (months < cal.n_months)
    mb = cal.month_bounds[np.clip(months, 0, cal.n_months - 1)]  # [N, M, 2]
    rel = np.clip(mb - dstart[:, None, None], 0, T)
    rel[..., 0] = np.minimum(rel[..., 0], rel[..., 1])
    rel = np.where(inside[..., None], rel, 0).astype(np.int32)

    # Next-month forecast targets; a window reaching past the last month is wholly invalid.
    fmonths = months + h
    f_ok = (am + h) < cal.n_months
    fi = np.clip(fmonths, 0, cal.n_months - 1)
    ft = fc_table[fi] * f_ok[:, None, None]
    fm = fc_mask_table[fi] & f_ok[:, None, None]

    first_d = store.daily_sources[0][0]
    cs = np.concatenate([[0.0], np.cumsum(store.daily_masks[first_d].mean(axis=1))])
    d_obs = ((cs[anchors + 1] - cs[anchors + 1 - T]) / T).astype(np.float32)
    targets = {
        "phase_index": tg["phase_index"][anchors],
        "phase_valid": tg["phase_valid"][anchors],
        "is_transition": tg["is_transition"][anchors],
        "fatalities": tg["fatalities"][am],
        "casualty_valid": tg["casualty_valid"][am],
        "anomaly": tg["anomaly"][anchors],
        "anomaly_valid": tg["anomaly_valid"][anchors],
        "forecast_targets": ft.astype(np.float32),
        "forecast_masks": fm,
        "daily_obs_rate": d_obs,
    }
    if store.monthly_sources:
        first_m = store.monthly_sources[0][0]
        per_month = store.monthly_masks[first_m].mean(axis=1)
        targets["monthly_obs_rate"] = per_month[months].mean(axis=1).astype(np.float32)
    return SplitData(name, anchors, am, stride, tuple(int(x) for x in day_range), rel, targets, store)
