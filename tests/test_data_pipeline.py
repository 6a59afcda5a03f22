"""Calendar, masks, normalisation, splits, targets and batches of the numpy data pipeline."""

import dataclasses

import jax
import numpy as np
import pytest

from han_jax.config import PHASE_TO_COARSE
from han_jax.data import (
    DataConfig,
    build_datasets,
    gather,
    iterate_batches,
    make_synthetic_world,
    num_batches,
)

COARSE = np.asarray(PHASE_TO_COARSE)


@pytest.fixture(scope="module")
def realistic():
    w = make_synthetic_world(0, "realistic")
    return w, build_datasets(w, DataConfig())


@pytest.fixture(scope="module")
def learnable():
    w = make_synthetic_world(0, "learnable")
    return w, build_datasets(w, DataConfig())


@pytest.fixture(scope="module")
def small():
    w = make_synthetic_world(3, "learnable", "small")
    return w, build_datasets(w, DataConfig.small())


# --- calendar and month boundaries (docs/data.md 1.4, 2.4 and 7.3) ---------------------------------------------


def test_calendar_default(realistic):
    _, ds = realistic
    cal = ds.calendar
    assert cal.n_days == 1434 and cal.n_months == 48
    assert str(cal.day_dates[0]) == "2022-02-24" and str(cal.day_dates[-1]) == "2026-01-27"
    assert tuple(cal.month_bounds[0]) == (0, 5)
    assert np.datetime64("2024-02-29") in cal.day_dates
    assert np.all(cal.month_bounds[1:, 0] == cal.month_bounds[:-1, 1])


def test_month_boundaries_example(realistic):
    _, ds = realistic
    cal = ds.calendar
    t = cal.day_index("2023-02-23")
    row = int(np.flatnonzero(ds.train.anchors == t)[0])
    assert row == 0  # the first train anchor (365-day look-back)
    mb = ds.train.month_boundaries[row]
    assert mb.dtype == np.int32 and mb.shape == (12, 2)
    assert tuple(mb[0]) == (5, 36) and tuple(mb[1]) == (36, 66)
    assert tuple(mb[-2]) == (311, 342) and tuple(mb[-1]) == (342, 365)
    inputs, _ = gather(ds.train, np.array([row]))
    np.testing.assert_array_equal(inputs.month_boundaries[0], mb)


def test_month_boundaries_cover_window(learnable):
    _, ds = learnable
    mb = ds.train.month_boundaries
    assert np.all(mb[..., 0] <= mb[..., 1])
    assert np.all(mb[:, -1, 1] == 365)  # the anchor's month is truncated at the anchor
    assert np.all(mb[:, 1:, 0] == mb[:, :-1, 1])


# --- splits --------------------------------------------------------------------------------------


def test_split_sizes_default(realistic):
    # han-jax's default val/test stride is 1 (every valid day), not the original's automatic stride.
    _, ds = realistic
    assert ds.info["split_days"] == {"train": (0, 1004), "val": (1004, 1219), "test": (1219, 1434)}
    assert ds.info["anchors"] == {"train": 640, "val": 215, "test": 215}
    assert ds.val.stride == 1 and ds.test.stride == 1
    np.testing.assert_array_equal(ds.val.anchors, np.arange(1004, 1219))
    np.testing.assert_array_equal(ds.test.anchors, np.arange(1219, 1434))
    assert ds.train.anchors.max() < ds.val.anchors.min() <= ds.val.anchors.max() < ds.test.anchors.min()
    assert any("anchors train=640 val=215 (stride 1) test=215 (stride 1)" in r for r in ds.report)


def test_split_sizes_automatic_stride(realistic):
    # val_sample_stride=None: the original's automatic stride, 10 anchors at stride 23.
    w, base = realistic
    ds = build_datasets(w, DataConfig(val_sample_stride=None))
    assert ds.info["anchors"] == {"train": 640, "val": 10, "test": 10}
    assert ds.val.stride == 23 and ds.test.stride == 23
    dates = [str(ds.calendar.day_dates[a]) for a in ds.test.anchors]
    assert dates[:2] == ["2025-06-27", "2025-07-20"] and dates[-1] == "2026-01-20"
    assert ds.train.anchors.max() < ds.val.anchors.min() <= ds.val.anchors.max() < ds.test.anchors.min()
    # The thinned anchors are a subset of the default's, with the same per-anchor targets.
    np.testing.assert_array_equal(ds.test.anchors, base.test.anchors[::23])
    np.testing.assert_array_equal(ds.test.targets["forecast_targets"], base.test.targets["forecast_targets"][::23])


def test_anchor_counts_default_and_main_job():
    # At least 100 val and test anchors on the embedded world, for the default and the README's main job.
    for cfg in (DataConfig(), DataConfig(daily_seq_len=90, monthly_seq_len=4)):
        ds = build_datasets(make_synthetic_world(0, "learnable"), cfg)
        assert ds.info["anchors"]["val"] >= 100 and ds.info["anchors"]["test"] >= 100
        assert ds.info["stride"] == {"train": 1, "val": 1, "test": 1}
    assert ds.info["anchors"] == {"train": 915, "val": 215, "test": 215}
    auto = build_datasets(make_synthetic_world(0, "learnable"), DataConfig(daily_seq_len=90, monthly_seq_len=4,
                                                                          val_sample_stride=None))
    assert auto.info["anchors"] == {"train": 915, "val": 10, "test": 10} and auto.val.stride == 23
    # The test preset: 300 days, 45 val and 45 test anchors (automatic: 12 at stride 4).
    small = build_datasets(make_synthetic_world(0, "learnable", "small"), DataConfig.small())
    assert small.info["anchors"] == {"train": 151, "val": 45, "test": 45}
    small_auto = build_datasets(make_synthetic_world(0, "learnable", "small"), DataConfig.small(val_sample_stride=None))
    assert small_auto.info["anchors"] == {"train": 151, "val": 12, "test": 12} and small_auto.val.stride == 4


def test_split_ratio_stride_embargo_configurable():
    w = make_synthetic_world(1, "learnable", "small")
    base = build_datasets(w, DataConfig.small())
    ds = build_datasets(w, DataConfig.small(val_ratio=0.2, test_ratio=0.1, val_sample_stride=2, embargo_days=7))
    n = ds.calendar.n_days
    assert ds.info["split_days"]["train"] == (0, n - int(n * 0.2) - int(n * 0.1))
    tr_end = ds.info["split_days"]["train"][1]
    assert ds.info["split_days"]["val"][0] == tr_end + 7
    assert ds.val.anchors.min() >= tr_end + 7 and np.all(np.diff(ds.val.anchors) == 2)
    assert base.info["split_days"]["val"][0] == base.info["split_days"]["train"][1]  # default: no gap


# --- masks, sentinel, normalisation ----------------------------------------------------------------


def test_mask_sentinel_consistency(realistic):
    _, ds = realistic
    st = ds.train.store
    for name in list(st.daily) + list(st.monthly):
        x = st.daily.get(name, st.monthly.get(name))
        m = st.daily_masks.get(name, st.monthly_masks.get(name))
        np.testing.assert_array_equal(~m, x == -999.0)
    assert not st.daily_masks["personnel"][0].any()  # day 0 unobserved (the source starts on day 1)
    assert (~st.monthly_masks["hdx_food"]).any(axis=0).sum() >= 5  # per-feature holes, not just row holes
    inputs, _ = next(iterate_batches(ds.test, 8))
    for name, x in inputs.monthly_features.items():
        assert np.all(x[~inputs.monthly_masks[name]] == 0.0)
        assert np.all(np.abs(x) < 900)
    assert not inputs.monthly_masks["sentinel"][:, -1].any()  # sentinel ends 2024-12


def test_stats_from_train_only():
    w = make_synthetic_world(2, "realistic", "small")
    cfg = DataConfig.small()
    ds = build_datasets(w, cfg)
    cal = ds.calendar
    tr_end = ds.info["split_days"]["train"][1]
    train_months = np.unique(cal.month_of_day[:tr_end])
    last_train_day = cal.month_bounds[train_months[-1], 1]
    # Corrupt everything after the last train month: the statistics must not move.
    w2 = dataclasses.replace(w, daily=dict(w.daily), monthly=dict(w.monthly))
    t = w.daily["personnel"]
    cut = cal.day_dates[last_train_day]
    vals = np.where((t.dates >= cut)[:, None], t.values * 1000 + 5e6, t.values)
    w2.daily["personnel"] = dataclasses.replace(t, values=vals)
    s = w.monthly["hdx_conflict"]
    mvals = np.where((s.dates >= cal.month_starts[len(train_months)])[:, None], 9e9, s.values)
    w2.monthly["hdx_conflict"] = dataclasses.replace(s, values=mvals)
    ds2 = build_datasets(w2, cfg)
    for name in ("personnel", "hdx_conflict"):
        np.testing.assert_allclose(ds.stats.mean[name], ds2.stats.mean[name])
        np.testing.assert_allclose(ds.stats.std[name], ds2.stats.std[name])
    # And they are the plain nanmean / nanstd (ddof 0) of the observed train rows, std floored at 0.1.
    rows = np.isin(cal.month_of_day, train_months)
    raw = np.full((cal.n_days, 12), np.nan)
    raw[(t.dates - cal.start).astype(int)] = t.values
    sel = raw[rows & ~np.all(np.isnan(raw), 1)]
    np.testing.assert_allclose(ds.stats.mean["personnel"], np.nanmean(sel, 0), rtol=1e-9)
    np.testing.assert_allclose(ds.stats.std["personnel"], np.maximum(np.nanstd(sel, 0), 0.1), rtol=1e-9)
    # Corrupting train data does move them.
    w3 = dataclasses.replace(w, daily=dict(w.daily))
    w3.daily["personnel"] = dataclasses.replace(t, values=t.values + 100.0)
    assert not np.allclose(build_datasets(w3, cfg).stats.mean["personnel"], ds.stats.mean["personnel"])


def test_std_floor():
    w = make_synthetic_world(2, "learnable", "small")
    t = w.daily["personnel"]
    vals = t.values.copy()
    vals[:, 3] = 7.0  # a constant feature
    w.daily["personnel"] = dataclasses.replace(t, values=vals)
    ds = build_datasets(w, DataConfig.small(std_floor=0.1))
    assert ds.stats.std["personnel"][3] == pytest.approx(0.1)
    assert ds.stats.mean["personnel"][3] == pytest.approx(7.0)
    ds2 = build_datasets(w, DataConfig.small(std_floor=0.5))
    assert ds2.stats.std["personnel"][3] == pytest.approx(0.5)


def test_obs_rates(realistic):
    _, ds = realistic
    tr, te = ds.train.targets, ds.test.targets
    assert tr["daily_obs_rate"].min() > 0.99
    assert tr["monthly_obs_rate"].mean() > 0.8
    assert te["monthly_obs_rate"][-1] == 0.0  # sentinel coverage ended
    assert te["monthly_obs_rate"][0] < tr["monthly_obs_rate"].mean()


# --- targets -------------------------------------------------------------------------------------


def test_forecast_targets(small):
    _, ds = small
    sp = ds.train
    st = sp.store
    cal = ds.calendar
    ft, fm = sp.targets["forecast_targets"], sp.targets["forecast_masks"]
    f_total = sum(f for _, f in ds.monthly_sources) + sum(f for _, f in ds.daily_sources)
    assert ft.shape == (len(sp), 3, f_total)
    # Monthly source: next month's normalised row.
    i = len(sp) // 2
    m = sp.anchor_months[i]
    nm = st.monthly_masks["sentinel"][m - 1 : m + 2]
    np.testing.assert_array_equal(fm[i, :, :7], nm)
    np.testing.assert_allclose(ft[i, :, :7], np.where(nm, st.monthly["sentinel"][m - 1 : m + 2], 0))
    assert np.all(ft[~fm] == 0)
    # Daily source (last block): the mean of the next calendar month's observed normalised days.
    lo, hi = cal.month_bounds[m + 1]
    d = st.daily["drones"][lo:hi]
    dm = st.daily_masks["drones"][lo:hi]
    np.testing.assert_allclose(ft[i, -1, -9:], (d * dm).sum(0) / dm.sum(0), rtol=1e-5)
    # Anchors in the last calendar month: the whole window is invalid.
    te = ds.test
    last = te.anchor_months == cal.n_months - 1
    assert last.any() and not te.targets["forecast_masks"][last].any()
    assert te.targets["forecast_masks"][~last].any()


def test_targets_per_anchor(realistic):
    w, ds = realistic
    tr = ds.train.targets
    assert set(np.unique(COARSE[tr["phase_index"]])) <= {2, 3}
    assert 3 <= tr["is_transition"].sum() <= 12
    for s in (ds.val, ds.test):
        assert len(np.unique(COARSE[s.targets["phase_index"]])) == 1
        assert not s.targets["is_transition"].any()
    assert not ds.test.targets["anomaly_valid"].any()  # VIIRS ends 2024-12-31
    assert tr["anomaly_valid"].mean() > 0.6
    # Fatalities: raw monthly counts of the anchor's month, equal to the hdx_conflict input (leakage).
    cal = ds.calendar
    m = ds.train.anchor_months
    np.testing.assert_allclose(tr["fatalities"], w.month_targets.fatalities[m])
    hc = w.monthly["hdx_conflict"]
    np.testing.assert_allclose(hc.values[m, 1], tr["fatalities"])
    assert tr["fatalities"].min() > 100 and cal.n_months == 48


def test_learnable_mode_recurs(learnable):
    _, ds = learnable
    for s in (ds.train, ds.val, ds.test):
        assert len(np.unique(COARSE[s.targets["phase_index"]])) >= 2
    assert len(np.unique(COARSE[ds.train.targets["phase_index"]])) == 4
    assert ds.test.targets["anomaly_valid"].mean() > 0.5


def _rank_correlation_with_time(values):
    """Spearman correlation of each column with time over its observed rows."""
    out = []
    for col in values.T:
        seen = np.flatnonzero(~np.isnan(col))
        if len(seen) < 6:
            continue
        ranks = np.argsort(np.argsort(col[seen]))
        out.append(abs(np.corrcoef(ranks, seen)[0, 1]))
    return np.asarray(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learnable_monthly_inputs_are_no_clocks(seed):
    """A series that only rises or falls names each training month (the model memorised regimes by it)."""
    learn = make_synthetic_world(seed, "learnable")
    real = make_synthetic_world(seed, "realistic")
    for name, table in learn.monthly.items():
        if name == "hdx_conflict":
            continue  # follows the intensity, whose growth stops half-way (checked through the drivers)
        rho = _rank_correlation_with_time(table.values)
        assert rho.max() < 0.6, (name, rho.round(2))
    # The realistic world keeps the original's clocks (inflating prices, a round counter).
    assert _rank_correlation_with_time(real.monthly["hdx_food"].values).max() > 0.9
    assert _rank_correlation_with_time(real.monthly["iom"].values).max() > 0.9


def test_missing_casualty_months():
    w = make_synthetic_world(0, "learnable", "small", missing_casualty_months=(6,))
    ds = build_datasets(w, DataConfig.small())
    tr = ds.train.targets
    hit = ds.train.anchor_months == 6
    assert hit.any() and not tr["casualty_valid"][hit].any() and tr["casualty_valid"][~hit].all()
    assert np.all(tr["fatalities"][hit] == 0)


# --- synthetic world properties (docs/data.md 7.3) -------------------------------------------------------


def test_synthetic_properties(realistic):
    w, _ = realistic
    inc = w.extras["increments"]
    for k in ("cruise_missiles", "mobile_SRBM_system"):
        assert (inc[k] == 0).mean() > 0.8
    for k in ("tank", "APC"):
        assert 0.02 < (inc[k] == 0).mean() < 0.3
    assert (w.daily["personnel"].values[:, 0] == 0).mean() < 0.05
    assert inc["personnel"].var() / inc["personnel"].mean() > 5
    pers, dr = w.daily["personnel"].values[:, 0], w.daily["drones"].values[:, 0]
    assert np.corrcoef(dr[:-7], pers[7:])[0, 1] > np.corrcoef(dr, pers)[0, 1]
    f = w.month_targets.fatalities
    assert f.min() > 0 and 0.25 < f.std() / f.mean() < 0.7
    iom = ~np.all(np.isnan(w.monthly["iom"].values), 1)
    assert 0.35 < iom.mean() < 0.75
    tr = w.day_targets.is_transition[1:]
    assert 8 <= tr.sum() <= 12
    runs = np.diff(np.flatnonzero(np.r_[True, tr, True]))
    assert runs.mean() > 50
    lam = w.extras["intensity"]
    assert lam[950:1050].mean() / lam[100:200].mean() > 3  # rising trend: distribution shift


def test_determinism_by_seed():
    a = make_synthetic_world(5, "learnable", "small")
    b = make_synthetic_world(5, "learnable", "small")
    c = make_synthetic_world(6, "learnable", "small")
    for k in a.daily:
        np.testing.assert_array_equal(a.daily[k].values, b.daily[k].values)
    for k in a.monthly:
        np.testing.assert_array_equal(a.monthly[k].values, b.monthly[k].values)
    np.testing.assert_array_equal(a.day_targets.phase_index, b.day_targets.phase_index)
    np.testing.assert_array_equal(a.day_targets.anomaly, b.day_targets.anomaly)
    assert not np.array_equal(a.daily["personnel"].values, c.daily["personnel"].values)
    da, db = build_datasets(a, DataConfig.small()), build_datasets(b, DataConfig.small())
    ba = list(iterate_batches(da.train, 16, shuffle=True, seed=1, epoch=2))
    bb = list(iterate_batches(db.train, 16, shuffle=True, seed=1, epoch=2))
    for x, y in zip(jax.tree_util.tree_leaves(ba), jax.tree_util.tree_leaves(bb)):
        np.testing.assert_array_equal(x, y)


# --- batches -------------------------------------------------------------------------------------


def _shapes(tree):
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]


def test_batches_fixed_shapes_and_padding(small):
    _, ds = small
    B = 16
    sp = ds.train
    batches = list(iterate_batches(sp, B))
    assert len(batches) == num_batches(sp, B) == -(-len(sp) // B)
    assert len(sp) % B != 0  # the last batch really is partial
    ref = _shapes(batches[0])
    struct = jax.tree_util.tree_structure(batches[0])
    for inputs, targets in batches:
        assert _shapes((inputs, targets)) == ref
        assert jax.tree_util.tree_structure((inputs, targets)) == struct
    inputs, targets = batches[0]
    assert inputs.daily_features["personnel"].shape == (B, 60, 12)
    assert inputs.daily_masks["drones"].dtype == bool
    assert inputs.monthly_features["sentinel"].shape == (B, 3, 7)
    assert inputs.month_boundaries.shape == (B, 3, 2) and inputs.month_boundaries.dtype == np.int32
    assert targets.phase_index.dtype == np.int32 and targets.fatalities.dtype == np.float32
    assert targets.forecast_targets.shape == (B, 3, 7 + 5 + 12 + 9)
    assert targets.daily_forecast_targets is None
    li, lt = batches[-1]
    k = len(sp) - (len(batches) - 1) * B
    assert lt.sample_mask.sum() == k and lt.sample_mask[:k].all()
    pad = ~lt.sample_mask
    for name in li.daily_features:
        assert np.all(li.daily_features[name][pad] == 0) and not li.daily_masks[name][pad].any()
    for name in li.monthly_features:
        assert np.all(li.monthly_features[name][pad] == 0) and not li.monthly_masks[name][pad].any()
    assert np.all(li.month_boundaries[pad] == 0)
    assert not (lt.phase_valid[pad].any() or lt.casualty_valid[pad].any() or lt.anomaly_valid[pad].any())
    assert not lt.forecast_masks[pad].any()
    # Every anchor exactly once per epoch.
    seen = np.concatenate([t.fatalities[t.sample_mask] for _, t in batches])
    assert len(seen) == len(sp)


def test_shuffle_by_seed_and_epoch(small):
    _, ds = small

    def rows(**kw):
        # Rows are identified by their anchor-day value.
        return np.concatenate([i.daily_features["personnel"][:, -1, 0] for i, _ in iterate_batches(ds.train, 16, **kw)])

    plain = rows()
    e0, e0b = rows(shuffle=True, seed=0, epoch=0), rows(shuffle=True, seed=0, epoch=0)
    e1 = rows(shuffle=True, seed=0, epoch=1)
    np.testing.assert_array_equal(e0, e0b)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, plain)
    np.testing.assert_allclose(np.sort(e0), np.sort(e1))


def test_pmap_batches_carry_a_device_axis(small):
    from han_jax.config import ConfigError
    from han_jax.training.devices import PmapDevices

    _, ds = small
    devices = PmapDevices(4)
    inputs, targets = next(devices.batches(ds.val, 8))
    assert inputs.daily_features["personnel"].shape == (4, 2, 60, 12)
    assert inputs.month_boundaries.shape == (4, 2, 3, 2)
    assert targets.sample_mask.shape == (4, 2) and targets.forecast_targets.shape[:2] == (4, 2)
    flat_i, flat_t = next(iterate_batches(ds.val, 8))
    np.testing.assert_array_equal(inputs.daily_features["drones"].reshape(8, 60, 9), flat_i.daily_features["drones"])
    np.testing.assert_array_equal(targets.sample_mask.reshape(8), flat_t.sample_mask)
    with pytest.raises(ConfigError, match="train.batch_size=6: expected a multiple of train.num_devices=4"):
        next(devices.batches(ds.val, 6))


def test_a_process_gathers_only_its_rows_of_each_global_batch(small):
    """``rows=``: one process's share of a global batch (han_jax.training.devices), the same rows as slicing the
    whole batch, padding included, for every batch of a shuffled epoch."""
    _, ds = small
    whole = list(iterate_batches(ds.train, 8, shuffle=True, seed=5, epoch=2))
    for rows in (slice(0, 4), slice(4, 8), slice(2, 6)):
        part = list(iterate_batches(ds.train, 8, shuffle=True, seed=5, epoch=2, rows=rows))
        assert len(part) == len(whole)
        for (pi, pt), (wi, wt) in zip(part, whole):
            jax.tree_util.tree_map(lambda p, w, r=rows: np.testing.assert_array_equal(p, w[r]), (pi, pt), (wi, wt))
    assert not whole[-1][1].sample_mask.all()  # the last batch is padded: its padding rows come along


def test_daily_forecast_flag(small):
    w, _ = small
    ds = build_datasets(w, DataConfig.small(daily_forecast_targets=True))
    _, t = next(iterate_batches(ds.test, 8))
    assert t.daily_forecast_targets.shape == (8, 7, 21) and t.daily_forecast_masks.dtype == bool
    _, t_last = list(iterate_batches(ds.test, 8))[-1]
    # The last test anchor's horizon runs past the end: invalid.
    last = np.flatnonzero(t_last.sample_mask)[-1]
    assert not t_last.daily_forecast_masks[last].any()
    assert np.all(t.daily_forecast_targets[~t.daily_forecast_masks] == 0)


def test_layout_exposed(learnable, small):
    _, ds = learnable
    assert ds.daily_sources == (("personnel", 12), ("drones", 9), ("armor", 9), ("artillery", 15))
    assert ds.monthly_sources == (("sentinel", 7), ("hdx_conflict", 5), ("hdx_food", 10), ("hdx_rainfall", 6),
                                  ("iom", 7))
    assert small[1].daily_sources == (("personnel", 12), ("drones", 9))
    assert ds.train.daily_sources == ds.daily_sources


def test_make_world_and_model_layout():
    from han_jax.config import ModelConfig
    from han_jax.data import make_world

    cfg = DataConfig.small(mode="realistic", seed=4)
    ds = build_datasets(make_world(cfg), cfg)
    mc = ModelConfig.small(**ds.model_layout())
    assert mc.daily_sources == ds.daily_sources and mc.n_monthly_features == 12
    assert ds.info["world"] == "synthetic-realistic-small-seed4"
    # A synthetic world restricted by the config's source names.
    cfg2 = DataConfig(preset="small", n_days=200, daily_seq_len=30, monthly_seq_len=2,
                      daily_sources=("armor",), monthly_sources=("iom",))
    ds2 = build_datasets(make_world(cfg2), cfg2)
    assert ds2.daily_sources == (("armor", 9),) and ds2.monthly_sources == (("iom", 7),)


def test_no_recompile_across_batches(small):
    _, ds = small
    traces = []

    @jax.jit
    def f(inputs, targets):
        traces.append(1)
        x = sum(v.sum() for v in inputs.daily_features.values())
        return x + (targets.forecast_targets * targets.forecast_masks).sum() * targets.sample_mask.sum()

    for split in (ds.train, ds.val, ds.test):
        for inputs, targets in iterate_batches(split, 16):
            f(inputs, targets)
    assert len(traces) == 1
