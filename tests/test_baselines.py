"""Each task's naive baselines and skill (han_jax/tasks): hand-computed tiny cases and the real pipeline."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_jax import tasks
from han_jax.app.evaluate import split_targets, with_baselines
from han_jax.app.runs import prepare
from han_jax.config import PHASE_TO_COARSE, LossConfig, ModelConfig
from han_jax.core.batch import Targets
from han_jax.tasks.forecast import next_month_elements
from han_jax.tasks.regime import balanced_accuracy, regime_labels
from tests.helpers import tiny_config

K = 4  # coarse regime classes
P2C = PHASE_TO_COARSE  # (0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3)
SOURCES = (("a", 2), ("b", 1))  # forecast columns: a = 0..1, b = 2
LOSS = LossConfig()
TASKS = tasks.tasks()
SCORED = ("regime", "transition", "casualty", "anomaly", "forecast")  # the tasks with a baseline and a skill


def model(sources=SOURCES):
    return ModelConfig(n_regime_classes=K, monthly_sources=sources)


def targets(n, *, phase=None, phase_valid=None, transition=None, fatalities=None, casualty_valid=None,
            anomaly=None, anomaly_valid=None, ft=None, fm=None, sample_mask=None) -> Targets:
    """A numpy ``Targets`` of ``n`` rows; unspecified fields are zeros with every flag True."""
    ones, zeros = np.ones(n, bool), np.zeros(n)
    ft = np.zeros((n, 3, 3)) if ft is None else np.asarray(ft, np.float32)
    return Targets(
        phase_index=np.asarray(zeros if phase is None else phase, np.int32),
        phase_valid=np.asarray(ones if phase_valid is None else phase_valid, bool),
        is_transition=np.asarray(zeros if transition is None else transition, bool),
        fatalities=np.asarray(zeros if fatalities is None else fatalities, np.float32),
        casualty_valid=np.asarray(ones if casualty_valid is None else casualty_valid, bool),
        anomaly=np.asarray(zeros if anomaly is None else anomaly, np.float32),
        anomaly_valid=np.asarray(ones if anomaly_valid is None else anomaly_valid, bool),
        forecast_targets=np.asarray(ft, np.float32),
        forecast_masks=np.ones(ft.shape, bool) if fm is None else np.asarray(fm, bool),
        sample_mask=np.asarray(ones if sample_mask is None else sample_mask, bool),
    )


def fit(t):
    """``{task: fitted baseline}``, every task fitted on ``t`` alone."""
    return {task.name: task.fit_baseline(t, model(), LOSS) for task in TASKS}


def fitted(regime=None, transition=None, casualty=None, forecast=None):
    return {"regime": regime, "transition": transition, "casualty": casualty, "anomaly": 0.0, "forecast": forecast,
            "daily_forecast": None}


def score(b, t, sources=SOURCES):
    out = {}
    for task in TASKS:
        out.update(task.baseline_metrics(b[task.name], t, model(sources), LOSS))
    return out


def skill(metrics):
    out = {}
    for task in TASKS:
        out.update(task.skill(metrics))
    return out


# ---------------------------------------------------------------------------
# Regime
# ---------------------------------------------------------------------------


def test_regime_majority_ignores_invalid_and_padding_rows():
    # coarse classes of the valid real rows: 1, 1, 0, 2, 3 -> majority 1; the invalid
    # row and the padding rows hold class 3 and would otherwise win.
    t = targets(8, phase=[3, 4, 0, 5, 9, 9, 9, 9], phase_valid=[1, 1, 1, 1, 1, 0, 1, 1],
                sample_mask=[1, 1, 1, 1, 1, 1, 0, 0])
    assert fit(t)["regime"] == 1


def test_regime_majority_tie_goes_to_lowest_class():
    # coarse 2, 2, 1, 1, 3: classes 1 and 2 tie.
    assert fit(targets(5, phase=[5, 6, 3, 4, 8]))["regime"] == 1
    assert fit(targets(2, phase=[10, 0]))["regime"] == 0


def test_regime_accuracy_and_balanced_accuracy():
    b = fitted(regime=1)
    # val coarse classes: 1, 1, 0, 3 (+ an invalid 0 and a padding 0): accuracy 2/4,
    # recall 1 for class 1, 0 for classes 0 and 3 -> balanced 1/3.
    t = targets(6, phase=[3, 4, 0, 9, 0, 0], phase_valid=[1, 1, 1, 1, 0, 1], sample_mask=[1, 1, 1, 1, 1, 0])
    m = score(b, t)
    assert m["baseline/regime_accuracy"] == pytest.approx(0.5)
    assert m["baseline/regime_balanced_accuracy"] == pytest.approx(1 / 3)


def test_regime_majority_absent_from_split_scores_zero_not_none():
    b = fitted(regime=1)
    m = score(b, targets(3, phase=[0, 5, 9]))  # coarse 0, 2, 3
    assert m["baseline/regime_accuracy"] == 0.0
    assert m["baseline/regime_balanced_accuracy"] == 0.0


def test_regime_balanced_accuracy_matches_the_model_definition():
    labels = np.array([1, 1, 0, 3, 3, 3])
    b = fitted(regime=3)
    m = score(b, targets(6, phase=[3, 4, 0, 9, 10, 8]))
    count = np.bincount(labels, minlength=K).astype(np.float64)
    correct = np.where(np.arange(K) == 3, count, 0.0)  # the constant predictor recalls its own class only
    assert m["baseline/regime_balanced_accuracy"] == pytest.approx(float(balanced_accuracy(correct, count)))
    assert m["baseline/regime_accuracy"] == pytest.approx(0.5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-2, 13), min_size=1, max_size=20), st.sampled_from([2, 4, 11]))
def test_regime_labels_are_the_same_on_the_host_and_in_a_step(phases, n_classes):
    import jax.numpy as jnp

    phase = np.asarray(phases, np.int32)
    want = np.asarray(regime_labels(jnp.asarray(phase), n_classes, P2C))
    np.testing.assert_array_equal(regime_labels(phase, n_classes, P2C), want)


# ---------------------------------------------------------------------------
# Transition, casualty, anomaly
# ---------------------------------------------------------------------------


def test_transition_rate_and_bce():
    # valid real rows: 1 of 4 is a transition; the invalid and the padding transitions do not count.
    train = targets(6, transition=[1, 0, 0, 0, 1, 1], phase_valid=[1, 1, 1, 1, 0, 1], sample_mask=[1, 1, 1, 1, 1, 0])
    b = fit(train)
    assert b["transition"] == pytest.approx(0.25)
    val = targets(3, transition=[1, 0, 1], phase_valid=[1, 1, 0])
    want = -(math.log(0.25) + math.log(0.75)) / 2
    assert score(b, val)["baseline/transition_bce"] == pytest.approx(want, rel=1e-12)


def test_transition_bce_clips_the_probability():
    b = fit(targets(3, transition=[0, 0, 0]))
    assert b["transition"] == 0.0
    bce = score(b, targets(2, transition=[1, 0]))["baseline/transition_bce"]
    assert bce == pytest.approx((-math.log(1e-7) - math.log1p(-1e-7)) / 2)
    assert math.isfinite(bce)


def test_casualty_mean_and_mae():
    train = targets(5, fatalities=[10, 20, 60, 1000, 5000], casualty_valid=[1, 1, 1, 0, 1],
                    sample_mask=[1, 1, 1, 1, 0])
    b = fit(train)
    assert b["casualty"] == pytest.approx(30.0)
    val = targets(4, fatalities=[0, 30, 100, 7], casualty_valid=[1, 1, 1, 0])
    assert score(b, val)["baseline/casualty_mae"] == pytest.approx((30 + 0 + 70) / 3)


def test_anomaly_mse_of_a_zero_score():
    val = targets(4, anomaly=[1, -2, 3, 5], anomaly_valid=[1, 1, 0, 1], sample_mask=[1, 1, 1, 0])
    assert score(fitted(), val)["baseline/anomaly_mse"] == pytest.approx(2.5)


# ---------------------------------------------------------------------------
# Forecast
# ---------------------------------------------------------------------------


def forecast_train():
    """Last month position: f0 = 1, 3 -> 2; f1 = 4 (row 1 masked) -> 4; f2 never valid -> 0, the normalisation's
    value for a feature without train data.

    The padding row (row 2) has valid masks and would change every mean.
    """
    ft = np.zeros((3, 2, 3))
    ft[:, 1] = [[1, 4, 9], [3, 100, 9], [50, 50, 50]]
    fm = np.ones((3, 2, 3), bool)
    fm[1, 1, 1] = False
    fm[:2, 1, 2] = False
    fm[:, 0] = False  # earlier positions do not enter the climatology
    return targets(3, ft=ft, fm=fm, sample_mask=[1, 1, 0])


def forecast_val():
    """E = {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)}: (1, 0) misses M-2, row 2 is padding."""
    ft = np.zeros((3, 3, 3))
    ft[:, 0] = 77.0  # position M-3 is never read
    ft[:, 1] = [[1, 2, 5], [9, 3, 0], [0, 0, 0]]  # M-2: "this month"
    ft[:, 2] = [[2, 6, 7], [8, 1, 0], [40, 40, 40]]  # M-1: next month
    fm = np.ones((3, 3, 3), bool)
    fm[:, 0] = False
    fm[1, 1, 0] = False  # M-2 missing: no persistence for (1, 0)
    return targets(3, ft=ft, fm=fm, sample_mask=[1, 1, 0])


def test_forecast_climatology():
    clim = fit(forecast_train())["forecast"]
    np.testing.assert_array_equal(clim, [2.0, 4.0, 0.0])
    assert clim.dtype == np.float64
    assert not clim.flags.writeable


def test_forecast_next_elements():
    t = forecast_val()
    e = next_month_elements(t.forecast_masks, t.sample_mask)
    np.testing.assert_array_equal(e, [[1, 1, 1], [0, 1, 1], [0, 0, 0]])
    # Masks that differ between M-1 and M-2 in the other direction drop the element too.
    fm = np.asarray(t.forecast_masks).copy()
    fm[0, 2, 1] = False
    np.testing.assert_array_equal(next_month_elements(fm, t.sample_mask), [[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    # One definition for the host and the step: the jax arrays give the same set.
    import jax.numpy as jnp

    np.testing.assert_array_equal(np.asarray(next_month_elements(jnp.asarray(fm), jnp.asarray(t.sample_mask))),
                                  next_month_elements(fm, t.sample_mask))
    with pytest.raises(ValueError, match="climatology"):
        score({**fit(forecast_train()), "forecast": np.zeros(2)}, t)


def test_forecast_persistence_and_climatology_mse():
    m = score(fit(forecast_train()), forecast_val())
    # persistence errors: (1-2)^2, (2-6)^2, (5-7)^2, (3-1)^2, (0-0)^2; climatology [2, 4, 0]: 0, 4, 49, 9, 0
    assert m["baseline/forecast_persistence_mse"] == pytest.approx(25 / 5)
    assert m["baseline/forecast_climatology_mse"] == pytest.approx(62 / 5)
    assert m["baseline/forecast_persistence_mse/a"] == pytest.approx(21 / 3)
    assert m["baseline/forecast_climatology_mse/a"] == pytest.approx(13 / 3)
    # Source b's feature has no train data: its climatology is 0, scored on the same elements as persistence.
    assert m["baseline/forecast_persistence_mse/b"] == pytest.approx(4 / 2)
    assert m["baseline/forecast_climatology_mse/b"] == pytest.approx(49 / 2)
    assert not any(k.startswith("n/") for k in m)  # every count beside the baselines is the model's


def test_forecast_sources_may_cover_the_first_columns_only():
    m = score(fit(forecast_train()), forecast_val(), sources=(("a", 1),))
    assert m["baseline/forecast_persistence_mse"] == pytest.approx(1.0)  # only (0, 0)
    assert m["baseline/forecast_climatology_mse"] == 0.0
    with pytest.raises(ValueError, match="columns"):
        score(fit(forecast_train()), forecast_val(), sources=(("a", 2), ("b", 2)))


def test_forecast_with_a_single_month_is_none():
    t = targets(2, ft=np.ones((2, 1, 3)))
    b = fit(t)
    np.testing.assert_array_equal(b["forecast"], [1.0, 1.0, 1.0])
    m = score(b, t)
    forecast = {k: v for k, v in m.items() if "forecast" in k}
    assert forecast and all(v is None for v in forecast.values())


def test_no_forecast_targets_at_all():
    t = dataclasses.replace(targets(2), forecast_targets=None, forecast_masks=None)
    b = fit(t)
    assert b["forecast"] is None
    m = score(b, t)
    assert m["baseline/forecast_persistence_mse"] is None and m["baseline/forecast_climatology_mse/a"] is None


# ---------------------------------------------------------------------------
# No valid rows, train-only fitting
# ---------------------------------------------------------------------------


def test_no_valid_rows_gives_none_everywhere():
    t = targets(3, phase=[3, 3, 3], transition=[1, 0, 1], fatalities=[5, 5, 5], anomaly=[1, 1, 1],
                ft=np.ones((3, 3, 3)), sample_mask=[0, 0, 0])
    b = fit(t)
    assert b["regime"] is None and b["transition"] is None and b["casualty"] is None
    np.testing.assert_array_equal(b["forecast"], 0.0)
    m = score(fit(forecast_train()), t)  # fitted baselines, but a split of padding only
    assert all(value is None for value in m.values()), m
    m = score(fitted(), targets(3, phase=[3, 3, 3]))  # valid rows, but nothing fitted
    for key, value in m.items():
        if key not in ("baseline/anomaly_mse", "baseline/forecast_persistence_mse",
                       "baseline/forecast_persistence_mse/a", "baseline/forecast_persistence_mse/b"):
            assert value is None, key


def test_per_task_flags_without_valid_rows():
    t = targets(2, phase_valid=[0, 0], casualty_valid=[0, 0], anomaly_valid=[0, 0])
    b = fit(t)
    assert b["regime"] is None and b["transition"] is None and b["casualty"] is None
    m = score(fitted(regime=0, transition=0.5, casualty=1.0), t)
    for key in ("regime_accuracy", "regime_balanced_accuracy", "transition_bce", "casualty_mae", "anomaly_mse"):
        assert m[f"baseline/{key}"] is None, key


def test_fitting_uses_only_the_train_targets():
    train = targets(4, phase=[3, 3, 9, 0], transition=[1, 0, 0, 0], fatalities=[1, 2, 3, 4])
    train = dataclasses.replace(train, forecast_targets=forecast_train().forecast_targets[[0, 1, 0, 1]],
                                forecast_masks=forecast_train().forecast_masks[[0, 1, 0, 1]])
    b = fit(train)
    val_a = forecast_val()
    val_b = dataclasses.replace(
        forecast_val(), phase_index=np.full(3, 9, np.int32), fatalities=np.full(3, 1e6, np.float32),
        forecast_targets=np.asarray(val_a.forecast_targets) * -5.0)
    m_a, m_b = score(b, val_a), score(b, val_b)
    assert m_a != m_b  # the validation targets change the scores ...
    again = fit(train)  # ... never the fitted baselines
    assert {k: v for k, v in b.items() if k != "forecast"} == {k: v for k, v in again.items() if k != "forecast"}
    np.testing.assert_array_equal(b["forecast"], again["forecast"])


# ---------------------------------------------------------------------------
# Skill
# ---------------------------------------------------------------------------


def base_metrics(**over):
    m = {
        "regime_balanced_accuracy": 0.75, "baseline/regime_balanced_accuracy": 0.5,
        "loss/transition": 0.3, "baseline/transition_bce": 0.6, "n/transition": 10.0,
        "casualty_mae": 5.0, "baseline/casualty_mae": 10.0,
        "anomaly_mse": 2.0, "baseline/anomaly_mse": 1.0,
        "forecast_next_mse": 3.0, "baseline/forecast_persistence_mse": 7.0,
        "baseline/forecast_climatology_mse": 13 / 3,
        "forecast_next_mse/a": 1.0, "baseline/forecast_persistence_mse/a": 2.0,
        "baseline/forecast_climatology_mse/a": 4.0,
        "forecast_next_mse/b": None, "baseline/forecast_persistence_mse/b": None,
        "baseline/forecast_climatology_mse/b": None,
    }
    m.update(over)
    return m


def test_skill_formulas():
    s = skill(base_metrics())
    assert s["skill/regime"] == pytest.approx(1 - 0.25 / 0.5)
    assert s["skill/transition"] == pytest.approx(0.5)
    assert s["skill/casualty"] == pytest.approx(0.5)
    assert s["skill/anomaly"] == pytest.approx(-1.0)
    assert s["skill/forecast"] == pytest.approx(1 - 3 / (13 / 3))  # the better baseline: climatology
    assert s["skill/forecast/a"] == pytest.approx(0.5)  # the better baseline: persistence
    assert s["skill/forecast/b"] is None
    assert set(s) == {f"skill/{t}" for t in SCORED} | {"skill/forecast/a", "skill/forecast/b"}


def test_skill_none_propagation():
    s = skill({})
    assert set(s) == {f"skill/{t}" for t in SCORED} and all(v is None for v in s.values())
    assert skill(base_metrics(casualty_mae=None))["skill/casualty"] is None
    assert skill(base_metrics(**{"baseline/anomaly_mse": None}))["skill/anomaly"] is None
    assert skill(base_metrics(**{"baseline/forecast_persistence_mse": None}))["skill/forecast"] is None
    assert skill(base_metrics(anomaly_mse=float("nan")))["skill/anomaly"] is None
    assert skill(base_metrics(**{"baseline/casualty_mae": float("inf")}))["skill/casualty"] is None
    m = base_metrics()
    del m["n/transition"]
    assert skill(m)["skill/transition"] is None
    assert skill(base_metrics(**{"n/transition": 0.0}))["skill/transition"] is None
    # a source the model reports but the baselines do not
    assert skill(base_metrics(**{"forecast_next_mse/c": 1.0}))["skill/forecast/c"] is None


def test_skill_with_a_zero_baseline_error_is_none():
    assert skill(base_metrics(**{"baseline/casualty_mae": 0.0}))["skill/casualty"] is None
    # one regime class present: the majority baseline is perfect (balanced accuracy 1)
    assert skill(base_metrics(**{"baseline/regime_balanced_accuracy": 1.0}))["skill/regime"] is None
    assert skill(base_metrics(**{"baseline/forecast_climatology_mse": 0.0}))["skill/forecast"] is None


def test_perfect_model_has_skill_one_and_the_best_baseline_zero():
    perfect = skill(base_metrics(regime_balanced_accuracy=1.0, casualty_mae=0.0, anomaly_mse=0.0,
                                    forecast_next_mse=0.0, **{"loss/transition": 0.0, "forecast_next_mse/a": 0.0}))
    assert all(v == 1.0 for k, v in perfect.items() if k != "skill/forecast/b")
    same = skill(base_metrics(regime_balanced_accuracy=0.5, casualty_mae=10.0, anomaly_mse=1.0,
                                 forecast_next_mse=13 / 3, **{"loss/transition": 0.6, "forecast_next_mse/a": 2.0}))
    assert all(v == 0.0 for k, v in same.items() if k != "skill/forecast/b")


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 1e6), st.floats(1e-6, 1e6), st.floats(1e-6, 1e6))
def test_skill_score_is_against_the_best_baseline(model, base1, base2):
    s = tasks.skill_score(model, [base1, base2])
    assert s == pytest.approx(1 - model / min(base1, base2))
    assert s <= 1.0


# ---------------------------------------------------------------------------
# The real pipeline
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_datasets():
    from han_jax.data import DataConfig, build_datasets, make_world

    cfg = DataConfig.small()
    return build_datasets(make_world(cfg), cfg)


def test_real_pipeline_baselines_are_finite_or_none(small_datasets):
    ds = small_datasets
    train = split_targets(ds.train)
    assert np.asarray(train.sample_mask).all() and len(train.sample_mask) == len(ds.train)
    b = fit(train)
    sources = tuple(ds.monthly_sources) + tuple(ds.daily_sources)
    val = split_targets(ds.val)
    m = score(b, val, sources)
    expected = {"baseline/regime_accuracy", "baseline/regime_balanced_accuracy", "baseline/transition_bce",
                "baseline/casualty_mae", "baseline/anomaly_mse", "baseline/forecast_persistence_mse",
                "baseline/forecast_climatology_mse"}
    for name, _ in sources:
        expected |= {f"baseline/forecast_persistence_mse/{name}", f"baseline/forecast_climatology_mse/{name}"}
    assert set(m) == expected
    for key, value in m.items():
        assert value is None or (isinstance(value, float) and math.isfinite(value)), (key, value)

    # A "model" following next_month_elements: predicting persistence reproduces the persistence
    # baseline; predicting the truth is perfect.
    e = next_month_elements(val.forecast_masks, val.sample_mask)
    assert e.sum() > 0
    y = np.asarray(val.forecast_targets, np.float64)
    persistence_mse = float(np.sum(np.where(e, (y[:, -2] - y[:, -1]) ** 2, 0.0)) / e.sum())
    assert persistence_mse == pytest.approx(m["baseline/forecast_persistence_mse"])
    best = min(m["baseline/forecast_persistence_mse"], m["baseline/forecast_climatology_mse"])
    s = skill({**m, "forecast_next_mse": best})
    assert s["skill/forecast"] == pytest.approx(0.0)
    assert skill({**m, "forecast_next_mse": 0.0})["skill/forecast"] == 1.0
    for value in s.values():
        assert value is None or math.isfinite(value)


def test_real_pipeline_fit_ignores_the_other_splits(small_datasets):
    ds = small_datasets
    b = fit(split_targets(ds.train))
    val = split_targets(ds.val)
    shifted = dataclasses.replace(val, fatalities=np.asarray(val.fatalities) + 1e4,
                                  forecast_targets=np.asarray(val.forecast_targets) + 3.0)
    sources = tuple(ds.monthly_sources)  # the columns the model's forecast head predicts
    m1, m2 = score(b, val, sources), score(b, shifted, sources)
    np.testing.assert_array_equal(b["forecast"], fit(split_targets(ds.train))["forecast"])
    if m1["baseline/casualty_mae"] is not None:
        assert m1["baseline/casualty_mae"] != m2["baseline/casualty_mae"]


def test_baselines_never_replace_the_model_s_numbers():
    with pytest.raises(ValueError, match="would replace the model's"):
        with_baselines({"n/forecast_next": 3.0}, {"n/forecast_next": 2.0}, TASKS)


# --- the proper-score baselines -------------------------------------------------------------------------------------


def _losses_context():
    config = tiny_config()
    config = config.replace(data=dataclasses.replace(config.data, source="losses", monthly_sources=None,
                                                     count_transform="log1p"))
    datasets, resolved = prepare(config)
    model = resolved.model(config.model)
    return datasets, tasks.TableContext(model, LossConfig(), datasets.normalisation, datasets.layout)


def test_the_zero_forecast_is_zero_counts_in_the_heads_units():
    datasets, ctx = _losses_context()
    train, val = split_targets(datasets.train), split_targets(datasets.val)
    zero = tasks.get("forecast").baseline_forecasts(train, val, None, ctx)["zero"]["forecast_next"][0]
    start = 0
    for src, feats in ctx.layout.monthly:
        back = ctx.normalisation.to_original_units("monthly", src, zero[start:start + len(feats)])
        np.testing.assert_allclose(back, 0.0, atol=1e-9)
        start += len(feats)
    assert start == zero.shape[0] == ctx.model.n_monthly_features


def test_every_forecaster_of_a_task_is_scored_on_the_same_elements():
    """Persistence's MASE is 1 by definition: its MAE and the denominator are taken on the same elements."""
    datasets, ctx = _losses_context()
    train, val = split_targets(datasets.train), split_targets(datasets.val)
    forecast = tasks.get("forecast")
    for name, fc in forecast.baseline_forecasts(train, val, None, ctx).items():
        scores = forecast.proper_scores(fc, val, ctx)
        assert scores["mae"] is not None and scores["mase"] is not None, name
        if name == "persistence":
            assert scores["mase"] == pytest.approx(1.0) and scores["crps"] == scores["mae"]
