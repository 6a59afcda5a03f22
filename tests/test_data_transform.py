"""DataConfig.count_transform (signed log1p before the train-only fit) and the val/test stride setting."""

import dataclasses
import os

import numpy as np
import pytest

from han_jax.config import DataConfig, config_from_dict, config_to_dict
from han_jax.data import (
    DataError,
    DayTargets,
    MonthTargets,
    SourceTable,
    World,
    build_datasets,
    load_losses_world,
    make_synthetic_world,
    make_world,
)
from han_jax.data.alignment import align_sources, data_calendar, select_sources
from han_jax.data.features import PERSONNEL_FEATURES, RATIO_FEATURES
from han_jax.data.normalisation import fit_norm_stats, normalise_sources
from han_jax.data.splits import split_day_ranges
from han_jax.data.transform import signed_log1p, transform_sources

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "losses")


def _hand_world(n_days=120):
    """One daily source: a count column with holes and negative corrections, a heavy-tailed count, a ratio."""
    rng = np.random.default_rng(0)
    dates = np.arange(np.datetime64("2022-03-01"), np.datetime64("2022-03-01") + n_days)
    counts = rng.poisson(np.linspace(5, 500, n_days)).astype(float)
    counts[[7, 50]] = [-3.0, -40.0]  # corrections
    counts[[20, 21, 90]] = np.nan  # per-feature holes
    heavy = np.exp(rng.normal(2.0, 1.5, n_days))
    ratio = rng.uniform(-5, 5, n_days)
    values = np.stack([counts, heavy, ratio], axis=1)
    values[60] = np.nan  # a whole missing row
    names = ("x_daily", "x_7day_avg", "intensity_ratio")
    daily = {"x": SourceTable("x", dates, values, names)}
    n = len(dates)
    day_t = DayTargets(dates, np.zeros(n, int), np.ones(n, bool), np.zeros(n, bool), np.zeros(n), np.zeros(n, bool))
    month_t = MonthTargets(np.zeros(0, "datetime64[D]"), np.zeros(0), np.zeros(0, bool))
    return World(daily, {}, day_t, month_t, name="hand")


def _hand_cfg(**kw):
    base = dict(daily_sources=("x",), monthly_sources=(), start_date="2022-03-01", daily_seq_len=10,
                monthly_seq_len=1, norm_whole_train_months=False)
    base.update(kw)
    return DataConfig(**base)


# --- the transform is applied before the fit, to every split, masks unchanged -----------------------------------


def test_stats_are_of_transformed_values():
    w = _hand_world()
    ds = build_datasets(w, _hand_cfg(count_transform="log1p"))
    raw = w.daily["x"].values
    tr_end = ds.info["split_days"]["train"][1]
    train = raw[:tr_end]
    train = train[~np.all(np.isnan(train), axis=1)]
    logged = signed_log1p(train)
    np.testing.assert_allclose(ds.stats.mean["x"][:2], np.nanmean(logged[:, :2], axis=0), rtol=1e-12)
    np.testing.assert_allclose(ds.stats.std["x"][:2], np.maximum(np.nanstd(logged[:, :2], axis=0), 0.1), rtol=1e-12)
    # The ratio column is left alone.
    np.testing.assert_allclose(ds.stats.mean["x"][2], np.nanmean(train[:, 2]), rtol=1e-12)
    none = build_datasets(w, _hand_cfg(count_transform="none"))
    np.testing.assert_allclose(none.stats.mean["x"][:2], np.nanmean(train[:, :2], axis=0), rtol=1e-12)
    assert none.stats.mean["x"][2] == ds.stats.mean["x"][2] and none.stats.std["x"][2] == ds.stats.std["x"][2]
    # Every split is normalised with the same train statistics of the transformed values.
    st = ds.train.store
    z = (signed_log1p(raw[:, :2]) - ds.stats.mean["x"][:2]) / ds.stats.std["x"][:2]
    ok = ~np.isnan(z)
    np.testing.assert_allclose(st.daily["x"][:, :2][ok], z[ok].astype(np.float32), rtol=1e-6)
    assert ds.info["count_transform"] == "log1p" and none.info["count_transform"] == "none"


def test_negative_values_signed():
    x = np.array([-40.0, -3.0, -0.5, 0.0, 0.5, 3.0, 1e6, np.nan])
    y = signed_log1p(x)
    np.testing.assert_allclose(y[:7], np.sign(x[:7]) * np.log1p(np.abs(x[:7])))
    assert y[3] == 0.0 and np.isnan(y[7]) and np.all(np.diff(y[:7]) > 0)


def test_missing_values_stay_missing():
    w = _hand_world()
    a = build_datasets(w, _hand_cfg(count_transform="none"))
    b = build_datasets(w, _hand_cfg(count_transform="log1p"))
    ma, mb = a.train.store.daily_masks["x"], b.train.store.daily_masks["x"]
    np.testing.assert_array_equal(ma, mb)
    raw_missing = np.isnan(w.daily["x"].values)
    np.testing.assert_array_equal(~mb, raw_missing)
    assert np.all(b.train.store.daily["x"][raw_missing] == -999.0)
    assert np.all(b.train.store.daily["x"][~raw_missing] != -999.0)
    # At the stage itself: NaN and a raw sentinel value pass through untouched.
    cfg = _hand_cfg()
    sources = select_sources(w, daily=cfg.daily_sources, monthly=cfg.monthly_sources)
    cal = data_calendar(sources.all_dates(), start_date=cfg.start_date, end_date=None, daily_seq_len=10,
                        monthly_seq_len=1)
    aligned = align_sources(sources, cal)
    aligned.daily["x"][5, 0] = -999.0
    out = transform_sources(aligned, sources, method="log1p", missing_value=-999.0).aligned.daily["x"]
    assert out[5, 0] == -999.0
    np.testing.assert_array_equal(np.isnan(out), np.isnan(aligned.daily["x"]))
    np.testing.assert_array_equal(out[:, 2], aligned.daily["x"][:, 2])


def test_forecast_targets_follow_the_transform():
    # The daily forecast targets are the monthly means of the transformed, normalised daily values.
    w = load_losses_world(FIXTURE)
    ds = build_datasets(w, DataConfig.losses(FIXTURE, daily_seq_len=60, monthly_seq_len=3,
                                             daily_forecast_targets=True))
    sp, st, cal = ds.test, ds.test.store, ds.calendar
    i = 0
    m = sp.anchor_months[i]
    lo, hi = cal.month_bounds[m + 1]
    d, dm = st.daily["artillery"][lo:hi], st.daily_masks["artillery"][lo:hi]
    np.testing.assert_allclose(sp.targets["forecast_targets"][i, -1, -15:], (d * dm).sum(0) / dm.sum(0), rtol=1e-5)
    # The stored values of every split are the transformed values' z-scores with the train statistics.
    t = w.daily["artillery"]
    idx = (t.dates - cal.start).astype(int)
    z = (signed_log1p(t.values) - ds.stats.mean["artillery"]) / ds.stats.std["artillery"]
    np.testing.assert_allclose(st.daily["artillery"][idx], z.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_fixture_losses_default_is_log1p():
    cfg = DataConfig.losses(FIXTURE, daily_seq_len=60, monthly_seq_len=3)
    assert cfg.count_transform == "log1p"
    assert DataConfig().count_transform == "none" and DataConfig.small().count_transform == "none"
    w = load_losses_world(FIXTURE)
    ds = build_datasets(w, cfg)
    none = build_datasets(w, dataclasses.replace(cfg, count_transform="none"))
    p = list(PERSONNEL_FEATURES)
    ratio = [p.index(f) for f in RATIO_FEATURES]
    counts = [j for j in range(12) if j not in ratio]
    np.testing.assert_array_equal(ds.stats.mean["personnel"][ratio], none.stats.mean["personnel"][ratio])
    # The count features' statistics are those of the transformed train rows (every day of every train month).
    cal, t = ds.calendar, w.daily["personnel"]
    tr_end = ds.info["split_days"]["train"][1]
    rows = np.isin(cal.month_of_day, np.unique(cal.month_of_day[:tr_end]))
    raw = np.full((cal.n_days, 12), np.nan)
    raw[(t.dates - cal.start).astype(int)] = t.values
    sel = raw[rows & ~np.all(np.isnan(raw), 1)]
    np.testing.assert_allclose(ds.stats.mean["personnel"][counts], np.nanmean(signed_log1p(sel[:, counts]), 0),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(none.stats.mean["personnel"][counts], np.nanmean(sel[:, counts], 0), rtol=1e-9)
    assert not np.allclose(ds.stats.mean["drones"], none.stats.mean["drones"])
    # The monthly sources built from the daily counts are transformed too: their statistics are those of the
    # transformed months, and the run's saved normalisation takes a forecast back to counts.
    train_months = np.arange(cal.n_months) < len(np.unique(cal.month_of_day[:tr_end]))
    for name, _ in ds.monthly_sources:
        assert w.monthly[name].counts
        t = w.monthly[name]
        raw = np.full((cal.n_months, t.n_features), np.nan)
        raw[(t.dates.astype("datetime64[M]") - cal.start.astype("datetime64[M]")).astype(int)] = t.values
        np.testing.assert_allclose(ds.stats.mean[name], np.nanmean(signed_log1p(raw[train_months]), 0), rtol=1e-9)
        assert not np.allclose(ds.stats.mean[name], none.stats.mean[name])
        z = ds.train.store.monthly[name][train_months][:2]
        np.testing.assert_allclose(ds.normalisation.to_original_units("monthly", name, z), raw[train_months][:2],
                                   rtol=1e-4, atol=1e-6)
    line = [r for r in ds.report if r.startswith("count transform: log1p")]
    assert len(line) == 1 and "43 of 45 daily features" in line[0] and "intensity_ratio" in line[0]
    assert "personnel_monthly, equipment_monthly" in line[0]
    assert any(r.startswith("count transform: none") for r in none.report)


# --- "none" is the pipeline without the stage, bit for bit ----------------------------------------------------------


def test_none_is_bit_identical():
    w = make_synthetic_world(0, "realistic")
    cfg = DataConfig()
    ds = build_datasets(w, cfg)
    # The stages without the transform, as build_datasets ran them before it existed.
    sources = select_sources(w, daily=cfg.daily_sources, monthly=cfg.monthly_sources)
    cal = data_calendar(sources.all_dates(), start_date=cfg.start_date, end_date=None,
                        daily_seq_len=cfg.daily_seq_len, monthly_seq_len=cfg.monthly_seq_len)
    ranges = split_day_ranges(cal.n_days, val_ratio=0.15, test_ratio=0.15, embargo_days=0)
    aligned = align_sources(sources, cal)
    assert transform_sources(aligned, sources, method="none", missing_value=-999.0).aligned is aligned
    stats = fit_norm_stats(aligned, cal, train_end=ranges["train"][1], whole_train_months=True, std_floor=0.1)
    ref = normalise_sources(aligned, stats, missing_value=-999.0)
    st = ds.train.store
    for n in ref.daily:
        assert st.daily[n].dtype == ref.daily[n].dtype
        np.testing.assert_array_equal(st.daily[n], ref.daily[n])
        np.testing.assert_array_equal(st.daily_masks[n], ref.daily_masks[n])
        np.testing.assert_array_equal(ds.stats.mean[n], stats.daily.mean[n])
        np.testing.assert_array_equal(ds.stats.std[n], stats.daily.std[n])
    for n in ref.monthly:
        np.testing.assert_array_equal(st.monthly[n], ref.monthly[n])
    # And count_transform=None (what `--set data.count_transform=none` parses to) is "none".
    ds2 = build_datasets(w, DataConfig(count_transform=None))
    for n in ref.daily:
        np.testing.assert_array_equal(ds2.train.store.daily[n], ref.daily[n])
    np.testing.assert_array_equal(ds2.test.targets["forecast_targets"], ds.test.targets["forecast_targets"])


# --- bad settings fail first, in one line ----------------------------------------------------------------------


def test_unknown_transform_names_the_field():
    with pytest.raises(DataError, match=r"^DataConfig\.count_transform='log'; expected one of 'none', 'log1p'$"):
        build_datasets(_hand_world(), _hand_cfg(count_transform="log"))
    # make_world checks it before loading anything: the missing directory is never looked at.
    with pytest.raises(DataError, match=r"DataConfig\.count_transform='Log1p'") as e:
        make_world(DataConfig.losses("/nonexistent/losses", count_transform="Log1p"))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"DataConfig\.count_transform"):
        make_world(DataConfig.small(count_transform="sqrt"))


@pytest.mark.parametrize("stride", [0, -2, 1.5])
def test_bad_stride_names_the_field(stride):
    with pytest.raises(DataError, match=r"DataConfig\.val_sample_stride=.*expected an int >= 1, or None"):
        make_world(DataConfig.small(val_sample_stride=stride))


def test_config_round_trip():
    cfg = DataConfig.losses(FIXTURE)
    d = config_to_dict(cfg)
    assert d["count_transform"] == "log1p" and d["val_sample_stride"] == 1
    assert config_from_dict(d, DataConfig) == cfg
    # A config.json written before these fields existed keeps its meaning for the stride it names.
    d_old = {k: v for k, v in config_to_dict(DataConfig(val_sample_stride=None)).items() if k != "count_transform"}
    old = config_from_dict(d_old, DataConfig)
    assert old.val_sample_stride is None and old.count_transform == "none"


# --- anchors: >= 100 per split by default, the original's automatic stride on request ---------------------------


def test_default_stride_gives_enough_anchors():
    w = make_synthetic_world(42, "learnable")
    ds = build_datasets(w, DataConfig(daily_seq_len=90, monthly_seq_len=4))
    assert len(ds.val) >= 100 and len(ds.test) >= 100
    assert ds.val.stride == 1 and np.all(np.diff(ds.val.anchors) == 1)
    auto = build_datasets(w, DataConfig(daily_seq_len=90, monthly_seq_len=4, val_sample_stride=None))
    assert len(auto.val) == 10 and len(auto.test) == 10 and auto.val.stride == auto.test.stride == 23
    assert set(auto.val.anchors) <= set(ds.val.anchors)
    explicit = build_datasets(w, DataConfig(daily_seq_len=90, monthly_seq_len=4, val_sample_stride=5))
    assert explicit.val.stride == 5 and len(explicit.val) == 43
