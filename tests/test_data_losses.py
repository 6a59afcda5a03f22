"""The real loss-data loader on the trimmed fixture and on the snapshot bundled with the package."""

import argparse
import json
import os

import numpy as np
import pytest

import han_jax
from han_jax.data import (
    DataConfig,
    build_datasets,
    bundled_losses_dir,
    iterate_batches,
    load_losses_world,
    make_world,
)
from han_jax.data.timeline import PHASE_TO_INDEX

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "losses")
CSV_DIR = os.path.join(HERE, "fixtures", "monthly_csv")
BUNDLED_LAST_DAY = "2025-12-31"


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


def test_bundled_snapshot_is_the_default_from_any_directory(tmp_path, monkeypatch):
    """``--data losses`` needs no ``--losses-dir``: the default is package data, not a path beside a checkout.

    The configuration says so with no folder at all (None), so a run's config.json finds it on any machine.
    """
    from han_jax.cli import build_config
    from han_jax.data import make_world

    monkeypatch.chdir(tmp_path)
    d = bundled_losses_dir()
    package = os.path.dirname(os.path.abspath(han_jax.__file__))
    assert os.path.isdir(d) and os.path.commonpath([package, os.path.abspath(d)]) == package
    for name in ("russia_losses_personnel.json", "russia_losses_equipment.json", "LICENSE", "README.md"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert DataConfig.losses().losses_dir is None
    w = load_losses_world()  # from tmp_path: nothing depends on the working directory
    assert str(w.daily["personnel"].dates[-1]) == BUNDLED_LAST_DAY
    assert str(make_world(DataConfig.losses()).daily["personnel"].dates[-1]) == BUNDLED_LAST_DAY
    args = argparse.Namespace(preset="tiny", data="losses", losses_dir=None, monthly_csv_dir=None, set=[])
    assert build_config(args).data.losses_dir is None  # what `han-jax train --data losses` runs with


def test_bundled_readme_names_the_snapshot():
    text = open(os.path.join(bundled_losses_dir(), "README.md")).read()
    assert "PetroIvaniuk/2022-Ukraine-Russia-War-Dataset" in text and "MIT" in text
    assert BUNDLED_LAST_DAY in text and "--losses-dir" in text
    for name in ("russia_losses_personnel.json", "russia_losses_equipment.json"):
        records = json.load(open(os.path.join(bundled_losses_dir(), name)))
        assert records[-1]["date"] == BUNDLED_LAST_DAY, name


def test_full_real_data():
    ds = build_datasets(make_world(DataConfig.losses()), DataConfig.losses())
    assert ds.calendar.n_days == 1407 and str(ds.calendar.end) == BUNDLED_LAST_DAY
    assert ds.info["anchors"] == {"train": 621, "val": 211, "test": 211}
    assert ds.daily_sources == (("personnel", 12), ("drones", 9), ("armor", 9), ("artillery", 15))
    assert ds.info["count_transform"] == "log1p"
    auto = build_datasets(make_world(DataConfig.losses()), DataConfig.losses(val_sample_stride=None))
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


def _fatalities_dir(tmp_path, first="2022-03", last="2025-11", skip="2023-06"):
    """A folder with the bundled JSON files and a monthly ``targets_fatalities.csv`` (one month left out)."""
    import shutil

    d = tmp_path / "real"
    d.mkdir()
    for name in ("russia_losses_personnel.json", "russia_losses_equipment.json"):
        shutil.copy(os.path.join(bundled_losses_dir(), name), d / name)
    months = np.arange(np.datetime64(first), np.datetime64(last) + 1)
    values = {str(m): 500 + 11 * i for i, m in enumerate(months) if str(m) != skip}
    (d / "targets_fatalities.csv").write_text("date,fatalities\n" + "".join(f"{m},{v}\n" for m, v in values.items()))
    return str(d), values


def test_fatalities_csv_with_the_real_records(tmp_path):
    """Through make_world + build_datasets (what train runs): each anchor's casualty target is its month's
    CSV value, valid exactly for the months the CSV has."""
    d, values = _fatalities_dir(tmp_path)
    cfg = DataConfig.losses(d, d, daily_seq_len=60, monthly_seq_len=3)
    ds = build_datasets(make_world(cfg), cfg)
    assert [r for r in ds.report if "casualty targets from" in r and f"{len(values)} valid months" in r]
    seen = set()
    for split in (ds.train, ds.val, ds.test):
        months = [str(m)[:7] for m in ds.calendar.month_starts[split.anchor_months]]
        want_valid = np.array([m in values for m in months])
        np.testing.assert_array_equal(split.targets["casualty_valid"], want_valid)
        want = np.array([values.get(m, 0) for m in months], np.float32)
        np.testing.assert_array_equal(split.targets["fatalities"], want)
        seen.update(months)
    assert "2023-06" in seen and "2025-12" in seen  # anchors in the CSV's gap and after its last month


@pytest.mark.integration
def test_train_on_real_records_with_fatalities_csv(tmp_path):
    """``han-jax train --data losses --losses-dir DIR --monthly-csv-dir DIR --preset tiny --epochs 1``: the
    casualty task has targets in every split and its loss is finite."""
    from han_jax.cli import main

    d, _ = _fatalities_dir(tmp_path, first="2022-02", last="2022-12", skip="2022-09")
    run_dir = str(tmp_path / "run")
    argv = ["train", "--data", "losses", "--losses-dir", d, "--monthly-csv-dir", d, "--preset", "tiny",
            "--epochs", "1", "--run-dir", run_dir, "--quiet", "--no-tensorboard",
            "--set", "data.end_date=2022-12-31"]
    assert main(argv) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    for split, m in summary["final"].items():
        assert m["targets/casualty"] > 0, split
        assert np.isfinite(m["loss/casualty"]), split


def test_viirs_csv_alone(tmp_path):
    """targets_viirs.csv without any other CSV (its report line used to count another file's rows, or raise
    NameError when there was none)."""
    import shutil

    shutil.copy(os.path.join(CSV_DIR, "targets_viirs.csv"), tmp_path / "targets_viirs.csv")
    rows = sum(1 for line in open(tmp_path / "targets_viirs.csv") if line.strip()) - 1
    w = load_losses_world(FIXTURE, str(tmp_path))
    assert _report(w, "VIIRS anomaly targets from", f": {rows} days")
    assert w.day_targets.anomaly_valid.any()
