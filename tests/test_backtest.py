"""``han-jax backtest``: origins, the summary's arithmetic, and (integration) no leakage and an exact resume."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from han_jax.app.backtest import (
    ORIGIN_FILE,
    ORIGINS_DIR,
    REPORT_FILE,
    TABLE_FILE,
    Settings,
    backtest,
    check_origins,
    parse_origins,
    summarise,
    summary_table,
)
from han_jax.app.runs import load_run
from han_jax.app.train import train
from han_jax.config import ConfigError
from han_jax.data import DataError, known_at, make_world
from tests.helpers import tiny_config
from tests.test_vintage import _changed_after


def test_origins_are_month_starts_with_a_step():
    days = parse_origins("2025-01:2025-12:3")
    assert [str(d) for d in days] == ["2025-01-01", "2025-04-01", "2025-07-01", "2025-10-01"]
    assert [str(d) for d in parse_origins("2024-11:2025-02")] == ["2024-11-01", "2024-12-01", "2025-01-01",
                                                                   "2025-02-01"]


@pytest.mark.parametrize("text, message", [
    ("2025-01", "expected FIRST:LAST[:STEP_MONTHS]"),
    ("January:2025-03", "expected months YYYY-MM"),
    ("2025-01:2025-03:0", "a step of whole months >= 1"),
    ("2025-01:2025-03:x", "a step of whole months >= 1"),
    ("2025-05:2025-03", "the last origin is before the first"),
])
def test_bad_origins_are_one_line_errors(text, message):
    with pytest.raises(ConfigError) as e:
        parse_origins(text)
    assert message in str(e.value) and str(e.value).startswith("--origins=")


def test_an_origin_whose_month_the_data_does_not_cover_is_refused():
    world = make_world(tiny_config().data)  # 2022-02-24 .. 2022-12-20
    check_origins(parse_origins("2022-10:2022-11"), world)
    with pytest.raises(ConfigError, match=r"origin 2022-12 forecasts 2022-12 \(to 2022-12-31\); the data ends on "
                                          r"2022-12-20"):
        check_origins(parse_origins("2022-10:2022-12"), world)


def _row(origin, forecaster, value, task="casualty", score="crps"):
    return {"origin": origin, "task": task, "score": score, "forecaster": forecaster, "value": value}


def test_the_summary_counts_origins_where_the_model_beats_the_best_baseline():
    origins = [
        {"scores": [_row("a", "model", 1.0), _row("a", "zero", 2.0), _row("a", "persistence", 0.5)]},  # loses
        {"scores": [_row("b", "model", 1.0), _row("b", "zero", 2.0), _row("b", "persistence", 1.5)]},  # wins
        {"scores": [_row("c", "model", 3.0), _row("c", "zero", None), _row("c", "persistence", 4.0),
                    _row("c", "model", 0.2, task="regime", score="balanced_accuracy"),
                    _row("c", "climatology", 0.25, task="regime", score="balanced_accuracy")]},
    ]
    report = summarise(origins, Settings({}, ("a", "b", "c"), "full"))
    rows = {(r["task"], r["score"], r["forecaster"]): r for r in report["summary"]}
    model = rows[("casualty", "crps", "model")]
    assert model["mean"] == pytest.approx(5.0 / 3) and model["origins"] == 3
    assert model["std"] == pytest.approx(np.std([1.0, 1.0, 3.0], ddof=1))
    assert model["model_beats_best_baseline"] == pytest.approx(2 / 3)
    assert rows[("casualty", "crps", "zero")]["origins"] == 2  # a missing value is not a zero
    assert rows[("casualty", "crps", "model")]["non_finite_origins"] == 0
    # Balanced accuracy is better when higher: 0.2 against 0.25 loses.
    assert rows[("regime", "balanced_accuracy", "model")]["model_beats_best_baseline"] == 0.0


def test_a_non_finite_score_is_counted_not_dropped():
    origins = [{"scores": [_row("a", "model", float("inf"), score="log_score"),
                           _row("b", "model", 2.0, score="log_score"),
                           _row("a", "zero", float("inf"))]}]
    report = summarise(origins, Settings({}, ("a", "b"), "full"))
    rows = {(r["task"], r["score"], r["forecaster"]): r for r in report["summary"]}
    assert rows[("casualty", "log_score", "model")]["non_finite_origins"] == 1
    assert rows[("casualty", "log_score", "model")]["mean"] == 2.0
    assert rows[("casualty", "crps", "zero")]["mean"] is None
    assert rows[("casualty", "crps", "zero")]["non_finite_origins"] == 1
    assert "1 non-finite origin(s) left out" in summary_table(report, title="t")


# ---------------------------------------------------------------------------
# End to end (tiny preset): each origin trains a run.
# ---------------------------------------------------------------------------

ORIGIN = np.datetime64("2022-10-01")


def _config():
    config = tiny_config()
    return config.replace(train=dataclasses.replace(config.train, epochs=2, tensorboard=False))


def _origin(run_dir, label="2022-10"):
    with open(os.path.join(run_dir, ORIGINS_DIR, label, ORIGIN_FILE)) as f:
        return json.load(f)


@pytest.mark.integration
def test_no_data_after_an_origin_reaches_its_forecast(tmp_path):
    """Changed or deleted data after the origin leaves the forecast bit-identical; after the scored month, the scores
    too."""
    config = _config()
    whole = make_world(config.data)
    runs = {}
    for name, world in (("whole", whole), ("after_origin", _changed_after(whole, ORIGIN)),
                        ("after_month", _changed_after(whole, np.datetime64("2022-11-01")))):
        runs[name] = str(tmp_path / name)
        backtest(config, runs[name], origins="2022-10:2022-10", quiet=True, log=lambda *a: None, world=world)
    base = _origin(runs["whole"])
    assert _origin(runs["after_origin"])["predictions"] == base["predictions"]
    assert _origin(runs["after_month"]) == base
    # The outcome did change in the first case: the same forecast scores differently.
    assert _origin(runs["after_origin"])["scores"] != base["scores"]
    # Without the cut, the same change reaches a model trained on the whole data.
    assert known_at(whole, "2022-11-01").daily["personnel"].values[-1].tolist() != \
        known_at(_changed_after(whole, ORIGIN), "2022-11-01").daily["personnel"].values[-1].tolist()


@pytest.mark.integration
def test_a_resumed_backtest_equals_an_uninterrupted_one(tmp_path):
    config = _config()
    straight = str(tmp_path / "straight")
    backtest(config, straight, origins="2022-10:2022-11", quiet=True, log=lambda *a: None)
    # Killed in the second origin's training after its first epoch, and after the first origin was complete.
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, ORIGINS_DIR))
    shutil.copytree(os.path.join(straight, ORIGINS_DIR, "2022-10"), os.path.join(resumed, ORIGINS_DIR, "2022-10"))
    shutil.copy(os.path.join(straight, "backtest_config.json"), resumed)
    second = config.replace(data=dataclasses.replace(config.data, known_at="2022-11-01"))
    folder = os.path.join(resumed, ORIGINS_DIR, "2022-11")
    train(second, folder, quiet=True, log=lambda *a: None, stop_after_epoch=0,
          world=known_at(make_world(config.data), "2022-11-01"))
    assert not os.path.exists(os.path.join(folder, ORIGIN_FILE))
    backtest(config, resumed, origins="2022-10:2022-11", quiet=True, log=lambda *a: None)
    assert _origin(resumed, "2022-11") == _origin(straight, "2022-11")
    with open(os.path.join(straight, TABLE_FILE)) as a, open(os.path.join(resumed, TABLE_FILE)) as b:
        assert a.read() == b.read()
    with open(os.path.join(resumed, REPORT_FILE)) as f:
        report = json.load(f)
    assert report["origins"] == ["2022-10", "2022-11"] and report["n_origins"] == 2
    # Another backtest's settings in the same folder are refused before any work.
    with pytest.raises(ConfigError, match="holds a backtest with other origins"):
        backtest(config, resumed, origins="2022-10:2022-10", quiet=True, log=lambda *a: None)
    # So is other data under the same settings (the origins done would mix with new ones).
    changed = _changed_after(make_world(config.data), np.datetime64("2022-09-01"))
    with pytest.raises(ConfigError, match="holds a backtest with other data"):
        backtest(config, resumed, origins="2022-10:2022-11", quiet=True, log=lambda *a: None, world=changed)


@pytest.mark.parametrize("field, value, message", [
    ("prediction_horizon", 2, "data.prediction_horizon=2: a backtest scores the month after each origin"),
    ("known_at", "2022-09-01", "a backtest sets it at each origin"),
    ("publication_lags", (("nowhere", 1),), r"data.publication_lags names \['nowhere'\]"),
])
def test_settings_a_backtest_cannot_honour_are_refused_before_any_work(tmp_path, field, value, message):
    config = _config()
    config = config.replace(data=dataclasses.replace(config.data, **{field: value}))
    with pytest.raises((ConfigError, DataError), match=message):
        backtest(config, str(tmp_path / "bt"), origins="2022-10:2022-10", quiet=True)
    assert not os.path.exists(tmp_path / "bt")


@pytest.mark.integration
def test_a_warm_refit_starts_each_origin_from_the_previous_best_state(tmp_path):
    config = _config()
    run_dir = str(tmp_path / "warm")
    backtest(config, run_dir, origins="2022-10:2022-11", refit="warm", quiet=True, log=lambda *a: None)
    with open(os.path.join(run_dir, ORIGINS_DIR, "2022-11", "train.log")) as f:
        second = f.read()
    with open(os.path.join(run_dir, ORIGINS_DIR, "2022-10", "train.log")) as f:
        first = f.read()
    previous = os.path.join(run_dir, ORIGINS_DIR, "2022-10")
    assert f"state: continued from {previous} (best checkpoint)" in second
    assert "state: continued from" not in first
    # The state is the previous origin's best one, counters included: the second origin's micro-batches
    # continue from where that state stopped (a fresh state would count from 0).
    best_before = int(load_run(previous, "best").state.step)
    second_run = load_run(os.path.join(run_dir, ORIGINS_DIR, "2022-11"), "latest")
    assert best_before > 0
    assert int(second_run.state.step) == best_before + config.train.epochs * second_run.resolved.steps_per_epoch
