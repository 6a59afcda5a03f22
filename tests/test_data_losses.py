"""The real loss-data loader on the trimmed fixture (and on ../shared/data/losses when present)."""

import os

import numpy as np
import pytest

from han_jax.data import DataConfig, build_datasets, iterate_batches, load_losses_world, make_world
from han_jax.data.timeline import PHASE_TO_INDEX

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "losses")
CSV_DIR = os.path.join(HERE, "fixtures", "monthly_csv")
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data", "losses"))


@pytest.fixture(scope="module")
def world():
    return load_losses_world(FIXTURE)


def _report(w, *words):
    return [r for r in w.report if all(x in r for x in words)]


def test_feature_counts(world):
    assert world.daily_sources == (("personnel", 12), ("drones", 9), ("armor", 9), ("artillery", 15))
    assert world.daily["artillery"].feature_names[9] == "mobile_SRBM_system_daily"
    p = world.daily["personnel"]
    assert str(p.dates[0]) == "2022-02-25" and str(p.dates[-1]) == "2023-09-16"
    # personnel_daily on 2022-02-26 is the difference of the cumulative counts (2800 -> 4300).
    assert p.values[1, 0] == 1500.0 and p.values[0, 0] == 0.0
    assert not np.isnan(p.values).any()


def test_regime_labels_and_transition(world):
    dt = world.day_targets

    def at(d):
        return int(np.flatnonzero(dt.dates == np.datetime64(d))[0])

    assert dt.phase_index[at("2022-03-15")] == PHASE_TO_INDEX["southern_offensive"]
    assert dt.phase_index[at("2022-05-10")] == PHASE_TO_INDEX["donbas_offensive"]
    assert dt.phase_index[at("2022-06-30")] == PHASE_TO_INDEX["baseline"]
    assert dt.phase_index[at("2023-09-15")] == PHASE_TO_INDEX["2023_counteroffensive"]
    assert dt.is_transition[at("2022-05-06")] and not dt.is_transition[at("2022-05-05")]
    assert dt.is_transition[at("2022-06-26")]
    assert dt.phase_valid.all()


def test_report_says_what_it_did(world):
    assert _report(world, "'POW'", "stops after 2022-04-27")
    assert _report(world, "'cruise_missiles'", "starts late on 2022-05-01")
    assert _report(world, "'mobile_SRBM_system'", "starts late on 2022-03-26", "stops after 2022-04-30")
    assert _report(world, "vehicles_and_fuel_tanks", "renamed")
    assert _report(world, "missing days", "2022-06-25..2023-09-11")
    assert _report(world, "submarines 2023-09-14")
    assert _report(world, "no casualty CSV") and _report(world, "no VIIRS")
    assert _report(world, "monthly means of the daily loss deltas")


def test_datasets_without_csv(world):
    ds = build_datasets(world, DataConfig.losses(FIXTURE, daily_seq_len=60, monthly_seq_len=3))
    assert ds.monthly_sources == (("personnel_monthly", 4), ("equipment_monthly", 8))
    assert ds.calendar.start == np.datetime64("2022-02-24")
    for s in (ds.train, ds.val, ds.test):
        assert len(s) > 0
        assert not s.targets["casualty_valid"].any() and not s.targets["anomaly_valid"].any()
        assert s.targets["phase_valid"].all()
    inputs, targets = next(iterate_batches(ds.train, 4))
    assert inputs.monthly_features["equipment_monthly"].shape == (4, 3, 8)
    assert targets.forecast_targets.shape == (4, 3, 4 + 8 + 45)


def test_monthly_csv(world):
    w = load_losses_world(FIXTURE, CSV_DIR)
    assert w.monthly_sources == (("hdx_conflict", 5),)
    assert _report(w, "casualty targets from the 'fatalities' column")
    mt = w.month_targets
    assert np.datetime64("2022-07-01") not in mt.months and np.datetime64("2022-08-01") in mt.months
    ds = build_datasets(w, DataConfig.losses(FIXTURE, CSV_DIR, daily_seq_len=60, monthly_seq_len=3))
    tr = ds.train.targets
    jul = ds.train.anchor_months == 5
    assert jul.any() and not tr["casualty_valid"][jul].any() and tr["casualty_valid"][~jul].all()
    assert tr["anomaly_valid"].any() and not tr["anomaly_valid"].all()
    assert np.abs(tr["anomaly"]).max() > 0


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data/losses not present")
def test_full_real_data():
    ds = build_datasets(make_world(DataConfig.losses(SHARED)), DataConfig.losses(SHARED))
    assert ds.calendar.n_days == 1407 and str(ds.calendar.end) == "2025-12-31"
    assert ds.info["anchors"] == {"train": 621, "val": 211, "test": 211}
    assert ds.daily_sources == (("personnel", 12), ("drones", 9), ("armor", 9), ("artillery", 15))
    assert ds.info["count_transform"] == "log1p"
    auto = build_datasets(make_world(DataConfig.losses(SHARED)), DataConfig.losses(SHARED, val_sample_stride=None))
    assert auto.info["anchors"] == {"train": 621, "val": 10, "test": 10}
    assert auto.val.stride == 23 and auto.test.stride == 23


def test_valid_fatalities_csv_end_to_end(tmp_path):
    """targets_fatalities.csv supplies the casualty targets (it used to crash the loader)."""
    import shutil

    csv_dir = tmp_path / "monthly"
    shutil.copytree(CSV_DIR, csv_dir)
    months = [f"2022-{m:02d}" for m in range(2, 13)] + [f"2023-{m:02d}" for m in range(1, 10)]
    values = {m: 1000 + 37 * i for i, m in enumerate(months) if m != "2022-09"}  # one month missing
    (csv_dir / "targets_fatalities.csv").write_text(
        "date,fatalities\n" + "".join(f"{m},{v}\n" for m, v in values.items()))
    w = load_losses_world(FIXTURE, str(csv_dir))
    assert _report(w, "casualty targets from", "targets_fatalities.csv", f"{len(values)} valid months")
    assert not _report(w, "the original's input/target leakage")  # the CSV wins over hdx_conflict's column
    ds = build_datasets(w, DataConfig.losses(FIXTURE, str(csv_dir), daily_seq_len=60, monthly_seq_len=3))
    tr = ds.train.targets
    assert tr["casualty_valid"].any() and not tr["casualty_valid"].all()
    got = {float(v) for v, ok in zip(tr["fatalities"], tr["casualty_valid"]) if ok}
    assert got <= {float(v) for v in values.values()}, "targets must come from the CSV"
