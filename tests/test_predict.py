"""Prediction on new data with a run's saved normalisation: newer data, units, layout checks, the CLI."""

import csv
import dataclasses
import os

import jax
import numpy as np
import pytest

from han_jax import config as configs
from han_jax.app.predict import predict, prediction_table
from han_jax.app.runs import load_run
from han_jax.cli import main
from han_jax.config import ConfigError, Resolved
from han_jax.data import DataConfig, DataError, build_datasets, iterate_batches, make_world
from han_jax.data.transform import signed_log1p
from han_jax.training.devices import SingleDevice
from han_jax.training.spec import StepSpec

NEWER_DAYS = 400  # the tiny run's world has 300 days, to 2022-12-20


@pytest.fixture(scope="module")
def run(tiny_run_dir):
    return load_run(tiny_run_dir)


@pytest.fixture(scope="module")
def newer(run):
    """The run's data source, 100 days longer than the data it was trained on."""
    return dataclasses.replace(run.config.data, n_days=NEWER_DAYS)


def test_predict_on_data_newer_than_training(tiny_run_dir, run, newer):
    trained_end = np.datetime64(make_world(run.config.data).daily["personnel"].dates[-1], "D")
    table = predict(run, data=newer, date_from="2022-12-01")
    dates = table["date"]
    assert dates[0] == np.datetime64("2022-12-01") and np.all(np.diff(dates).astype(int) == 1)
    assert dates[-1] == np.datetime64("2023-03-30") > trained_end  # ~100 anchors after the training data
    numeric = {k: v for k, v in table.columns.items() if not k.startswith("actual/") and v.dtype.kind == "f"}
    for name, values in numeric.items():
        assert np.all(np.isfinite(values)), name
    np.testing.assert_allclose(sum(table[f"regime_prob/{k}"] for k in range(4)), 1.0, rtol=1e-5)
    # No next month in the data for the last anchors: their actual forecast values are missing.
    assert np.isnan(table["actual/sentinel/s1_radar"][-1])

    # De-normalisation: the forward pass's normalised forecast, times the SAVED std, plus the SAVED mean.
    windows = run.windows(data=newer, date_from="2022-12-01")
    test = SingleDevice().compiled(run.spec).test
    z = np.concatenate([np.asarray(jax.device_get(test(run.state, inputs, targets).predictions["forecast_next"]))[
        np.asarray(targets.sample_mask)] for inputs, targets in iterate_batches(windows.split, 8)])
    with np.load(os.path.join(tiny_run_dir, "norm_stats.npz")) as saved:
        mean, std = saved["monthly/hdx_conflict/mean"], saved["monthly/hdx_conflict/std"]
    j = 2  # civilian_targeting, the third feature of the second monthly source (after sentinel's 7)
    np.testing.assert_allclose(table["forecast/hdx_conflict/civilian_targeting"], z[:, 7 + j] * std[j] + mean[j],
                               rtol=1e-6)
    # Never refitted: the new data's inputs are z-scored with the saved statistics, not its own.
    raw = make_world(newer).monthly["hdx_conflict"]
    month = int(np.flatnonzero(raw.dates == np.datetime64("2023-03-01"))[0])
    stored = windows.split.store.monthly["hdx_conflict"]
    row = int((np.datetime64("2023-03", "M") - windows.calendar.start.astype("datetime64[M]")).astype(int))
    np.testing.assert_allclose(stored[row], (raw.values[month] - mean) / std, rtol=1e-5)
    # Actual values where the data has them, in the data's units.
    i = int(np.flatnonzero(dates == np.datetime64("2023-01-15"))[0])
    feb = raw.values[int(np.flatnonzero(raw.dates == np.datetime64("2023-02-01"))[0])]
    np.testing.assert_allclose(table["actual/hdx_conflict/events"][i], feb[0], rtol=1e-6)


def test_default_anchor_is_the_newest_day_the_data_allows(run, newer):
    windows = run.windows(data=newer)
    assert list(windows.dates) == [np.datetime64("2023-03-30")]
    assert len(windows.split) == 1


def test_data_with_another_layout_is_an_error_naming_the_difference(run):
    world = make_world(run.config.data)
    sentinel = world.monthly["sentinel"]
    names = list(sentinel.feature_names)
    names[3] = "s5p_so2"
    world.monthly["sentinel"] = dataclasses.replace(sentinel, feature_names=tuple(names))
    with pytest.raises(DataError, match="monthly source 'sentinel' feature 3 is 's5p_so2', the run's is 's5p_co'"):
        run.windows(world)
    world = make_world(run.config.data)
    del world.monthly["hdx_conflict"]
    with pytest.raises(DataError, match="hdx_conflict"):
        run.windows(world)
    # A source the run's selection takes all of (None) must not grow.
    taking_all = dataclasses.replace(run.config.data, monthly_sources=None)
    world = make_world(run.config.data)
    world.monthly["iom"] = dataclasses.replace(sentinel, name="iom")
    from han_jax.data import build_inference_windows

    with pytest.raises(DataError, match=r"not in the run \['iom'\]"):
        build_inference_windows(world, taking_all, run.normalisation, run.layout)
    with pytest.raises(ValueError, match="data.daily_seq_len=30 differs from the run's 60"):
        run.windows(data=dataclasses.replace(run.config.data, daily_seq_len=30))


def test_dates_outside_the_data_are_clear_errors(run):
    with pytest.raises(DataError, match="date_to=2024-01-01: the data covers 2022-02-24..2022-12-20"):
        run.windows(date_to="2024-01-01")
    with pytest.raises(DataError, match="no anchor in 2022-02-24..2022-03-01: a window needs 60 days"):
        run.windows(date_from="2022-02-24", date_to="2022-03-01")
    with pytest.raises(DataError, match=r"--from='2022-13-45'; expected a date YYYY-MM-DD"):
        main(["--debug", "predict", "--run-dir", "/nonexistent", "--from", "2022-13-45"])


def test_daily_forecasts_are_reported_in_original_units_through_the_inverse_count_transform():
    """The direct daily head's forecast (``use_latent_forecast=False``), de-normalised and log1p undone."""
    cfg = DataConfig.small(count_transform="log1p")
    ds = build_datasets(make_world(cfg), cfg)
    config = configs.tiny().replace(data=cfg,
                                    model=dataclasses.replace(configs.tiny().model, use_latent_forecast=False))
    spec = StepSpec.of(config, Resolved(**ds.model_layout()))
    n, h = len(ds.test), spec.model.daily_forecast_horizon
    rng = np.random.default_rng(0)
    preds = {"regime_probs": np.full((n, 4), 0.25), "transition_prob": rng.random(n),
             "expected_fatalities": rng.random(n), "zinb_pi": rng.random(n), "zinb_mu": rng.random(n),
             "zinb_theta": rng.random(n), "anomaly_logit": rng.normal(size=n),
             "forecast_next": rng.normal(size=(n, spec.model.n_monthly_features)),
             "daily_forecast": rng.normal(size=(n, h, spec.model.n_daily_features))}
    table = prediction_table(preds, ds.test, ds.calendar.day_dates[ds.test.anchors], spec=spec,
                             normalisation=ds.normalisation, layout=ds.layout)
    # Sorted source names: drones (9 features) first, then personnel.
    stats = ds.normalisation.stats.daily
    z = preds["daily_forecast"][:, 2, 0]  # day t+3, drones' first feature (drone_daily, a count)
    y = z * stats.std["drones"][0] + stats.mean["drones"][0]
    np.testing.assert_allclose(table["daily_forecast/d3/drones/drone_daily"], np.sign(y) * np.expm1(np.abs(y)),
                               rtol=1e-9)
    np.testing.assert_allclose(signed_log1p(table["daily_forecast/d3/drones/drone_daily"]), y, rtol=1e-9)
    # A ratio feature is not transformed: the z-score alone is undone.
    i = ds.layout.features("daily")["personnel"].index("intensity_ratio")
    z = preds["daily_forecast"][:, 0, 9 + i]
    np.testing.assert_allclose(table["daily_forecast/d1/personnel/intensity_ratio"],
                               z * stats.std["personnel"][i] + stats.mean["personnel"][i], rtol=1e-9)


def test_cli_predict_writes_the_csv_and_the_picture(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "august" / "predictions.csv"
    assert main(["predict", "--run-dir", tiny_run_dir, "--set", f"data.n_days={NEWER_DAYS}", "--from", "2023-03-25",
                 "--to", "2023-03-30", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[:2] == ["date", "forecast_month"] and "split" not in header
    assert [r[0] for r in body] == [f"2023-03-{d}" for d in range(25, 31)]
    assert {r[1] for r in body} == {"2023-04-01"}
    assert os.path.getsize(tmp_path / "august" / "forecast.png") > 0
    printed = capsys.readouterr().out
    assert "2023-03-30: regime probabilities" in printed and "2023-04 forecast, sentinel: s1_radar" in printed
    with pytest.raises(ConfigError, match="predict changes only where the data is"):
        main(["--debug", "predict", "--run-dir", tiny_run_dir, "--set", "model.d_model=8"])
