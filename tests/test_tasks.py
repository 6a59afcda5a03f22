"""One task, one place: the registry, a toy seventh task added through it alone, one statistics pass per step,
and one element set for the next-month forecast of the model and its baselines."""

import collections
import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax import tasks
from han_jax.app.evaluate import metrics_table, split_baselines, with_baselines
from han_jax.app.predict import prediction_table
from han_jax.config import ConfigError, ModelConfig
from han_jax.core.batch import Targets
from han_jax.core.reductions import masked_sum, ratio, sum_and_count
from han_jax.objective import Objective, forward_statistics, metrics_from_statistics, to_host_metrics
from han_jax.tasks.base import Task, host_mean, skill_score, valid_rows
from han_jax.training.devices import SingleDevice
from han_jax.training.spec import StepSpec
from han_jax.training.steps import create_train_state, eval_step, make_model, train_step
from tests.helpers import fresh

ORIGINAL = ("regime", "transition", "casualty", "anomaly", "forecast", "daily_forecast")


def test_the_registry_holds_the_original_s_tasks_in_its_order():
    assert tasks.names() == ORIGINAL
    assert {t.name: t.prior for t in tasks.tasks()} == {"regime": 1.05, "transition": 1.4, "casualty": 1.4,
                                                        "anomaly": 1.4, "forecast": 1.9, "daily_forecast": 1.4}
    assert [t.name for t in tasks.tasks() if t.watch_collapse] == ["regime", "anomaly", "forecast"]
    # Hashable, equal by type, with a stable repr: a tuple of them keys compiled steps across processes.
    assert tasks.tasks() == tasks.tasks() and hash(tasks.tasks()) == hash(tasks.tasks())
    assert repr(tasks.get("forecast")) == "ForecastTask()"
    with pytest.raises(ValueError, match="registered already"):
        tasks.register(tasks.get("regime"))
    with pytest.raises(KeyError, match="no task named 'geography'"):
        tasks.get("geography")


class LevelTask(Task):
    """A toy seventh task: the level of next month (the mean of its monthly features), from the forecast head."""

    name = "level"
    outputs = ("forecast_pred",)
    prior = 0.5
    metric_counts = {"level_mae": "n/level"}
    table_rows = ("level_mae", "baseline/level_mae")

    @staticmethod
    def _levels(pred, targets, row):
        f = pred.shape[-1]
        mask = jnp.asarray(targets.forecast_masks)[:, -1, :f].astype(bool)
        truth = jnp.where(mask, jnp.asarray(targets.forecast_targets)[:, -1, :f], 0.0).sum(-1) / jnp.maximum(
            mask.sum(-1), 1)
        return pred.mean(-1), truth, row & mask.any(-1)

    def statistics(self, outputs, targets, row, config, axis_name):
        level, truth, valid = self._levels(outputs["forecast_pred"][:, -1], targets, row)
        stats = {"abs_sum": masked_sum(jnp.abs(level - truth), valid, axis_name=axis_name)}
        stats["sq_sum"], stats["n_valid"] = sum_and_count(jnp.square(level - truth), valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        return ratio(s["sq_sum"], s["n_valid"]), s["n_valid"]

    def metrics(self, s, model):
        return {"level_mae": ratio(s["abs_sum"], s["n_valid"]), "n/level": s["n_valid"]}

    def fit_baseline(self, train, model, loss):
        return 0.0  # "next month at the normalised mean"

    def baseline_metrics(self, zero, targets, model, loss):
        f = model.n_monthly_features
        mask = np.asarray(targets.forecast_masks)[:, -1, :f]
        truth = np.where(mask, np.asarray(targets.forecast_targets)[:, -1, :f], 0.0).sum(-1) / np.maximum(
            mask.sum(-1), 1)
        valid = valid_rows(targets, mask.any(-1))
        return {"baseline/level_mae": host_mean(np.abs(truth - zero), valid)}

    def skill(self, metrics):
        return {"skill/level": skill_score(metrics.get("level_mae"), [metrics.get("baseline/level_mae")])}

    def predict(self, outputs, model, loss):
        return {"level": outputs["forecast_pred"][:, -1].astype(jnp.float32).mean(-1)}

    def columns(self, predictions, targets, ctx):
        return {"level": np.asarray(predictions["level"], np.float64)}


@pytest.mark.slow
def test_a_seventh_task_joins_through_the_registry_alone_and_trains(tiny):
    """Registering the task is all it takes: its loss is aggregated and trained, its log-variance created, its
    metrics, baselines, skill, prediction column and table rows reported, by code that never names it."""
    with tasks.using(LevelTask()) as registered:
        assert [t.name for t in registered] == [*ORIGINAL, "level"]
        # A run folder records its tasks: the tiny run's six do not load as this process's seven.
        with pytest.raises(ConfigError, match=r"tasks \['regime'.*'daily_forecast'\]: the run's tasks"):
            StepSpec.of(tiny.config, tiny.resolved)
        spec = StepSpec.of(tiny.config, dataclasses.replace(tiny.resolved, tasks=tasks.names()))
        baselines = split_baselines(tiny.datasets, spec)
    assert tasks.names() == ORIGINAL  # the registry is as it was; the specification keeps its tasks
    assert spec.objective.weighted[-1] == "level" and spec != tiny.spec
    inputs, targets = tiny.batch
    steps = SingleDevice().steps(spec, tiny.schedule)
    state = steps.start_epoch(create_train_state(jax.random.PRNGKey(0), spec, inputs), 0)
    assert float(state.log_vars["level"]) == 0.5
    new_state, out = steps.train_deterministic(fresh(state), inputs, targets)
    m = jax.device_get(out.metrics)
    # The toy loss, from the test step's predictions and a numpy oracle, is in the Kendall total.
    preds = jax.device_get(steps.test(state, inputs, targets).predictions)
    mask = np.asarray(targets.forecast_masks)[:, -1, :preds["forecast_next"].shape[-1]]
    truth = np.where(mask, np.asarray(targets.forecast_targets)[:, -1, :mask.shape[1]], 0).sum(-1) / np.maximum(
        mask.sum(-1), 1)
    valid = np.asarray(targets.sample_mask) & mask.any(-1)
    np.testing.assert_allclose(preds["level"], preds["forecast_next"].mean(-1), rtol=1e-6)
    np.testing.assert_allclose(m["loss/level"], np.mean((preds["level"] - truth)[valid] ** 2), rtol=1e-5)
    np.testing.assert_allclose(m["level_mae"], np.mean(np.abs(preds["level"] - truth)[valid]), rtol=1e-5)
    assert m["included/level"] == 1.0 and m["targets/level"] == valid.sum()
    np.testing.assert_allclose(m["weighted_total"], sum(m[f"contribution/{t}"] for t in spec.objective.weighted)
                               + m["reg_term"], rtol=1e-6)
    assert float(new_state.log_vars["level"]) != 0.5  # trained
    # Reports iterate the specification's tasks.
    metrics = with_baselines(to_host_metrics(out.metrics, spec.objective.tasks), baselines["train"],
                             spec.objective.tasks)
    assert metrics["skill/level"] == pytest.approx(1 - metrics["level_mae"] / metrics["baseline/level_mae"])
    table = metrics_table({"train": metrics}, spec.objective.tasks, title="t")
    assert "level_mae" in table and "baseline/level_mae" in table and "skill/level" in table
    split = tiny.datasets.test
    n = len(split)
    rows = {k: np.zeros((n,) + np.shape(v)[1:]) for k, v in preds.items() if k != "sample_mask"}
    columns = prediction_table(rows, split, tiny.datasets.calendar.day_dates[split.anchors], spec=spec,
                               normalisation=tiny.datasets.normalisation, layout=tiny.datasets.layout).columns
    assert list(columns)[-1] == "level"


def test_a_task_from_outside_the_package_keys_the_stored_steps_by_its_code(tiny, tmp_path, monkeypatch):
    """han-jax's source fingerprint covers its own files only: a task written elsewhere keys the stored
    executables by a hash of its module's file, so an edited task never loads the steps of its old code."""
    module = tmp_path / "outside_task.py"
    source = "from tests.test_tasks import LevelTask\n\nclass OutsideTask(LevelTask):\n    prior = {prior}\n"
    monkeypatch.syspath_prepend(str(tmp_path))
    resolved = dataclasses.replace(tiny.resolved, tasks=None)

    def task_code(prior):
        module.write_text(source.format(prior=prior))
        loaded = importlib.import_module("outside_task")
        loaded = importlib.reload(loaded)
        return StepSpec.of(tiny.config, resolved, tasks=(*tasks.tasks(), loaded.OutsideTask())).task_code

    first, edited = task_code(0.5), task_code(0.25)
    assert first[:-1] == edited[:-1] == tuple((f"{type(t).__module__}.{type(t).__qualname__}", "")
                                              for t in tasks.tasks())
    assert first[-1][0] == edited[-1][0] == "outside_task.OutsideTask"
    assert first[-1][1] != edited[-1][1] and len(first[-1][1]) == 64


def test_each_step_computes_each_task_s_statistics_once(tiny, monkeypatch):
    """One statistics pass: the objective and every reported metric (all rows and both observation-rate strata)
    read the same statistics, computed once per task per step."""
    calls = collections.Counter()
    for task in tiny.spec.objective.tasks:
        original = type(task).statistics

        def counted(self, *args, original=original, **kwargs):
            calls[self.name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(task), "statistics", counted)
    state = jax.eval_shape(lambda: tiny.state)
    inputs, targets = tiny.batch
    jax.jit(functools.partial(train_step, spec=tiny.spec)).lower(state, inputs, targets, tiny.schedule)
    assert calls == {name: 1 for name in ORIGINAL}
    calls.clear()
    jax.jit(functools.partial(eval_step, spec=tiny.spec)).lower(state, inputs, targets)
    assert calls == {name: 1 for name in ORIGINAL}


def test_every_metric_is_defined_for_a_batch_without_any_target(tiny):
    """Targets absent altogether (a batch of unlabelled days, M >= 2): every task takes its fallback (the
    regime its temporal-consistency term), counts 0 targets and still reports each of its metrics."""
    inputs, targets = tiny.batch
    model = make_model(tiny.spec)
    shapes = jax.eval_shape(lambda: model.apply({"params": tiny.state.params}, inputs, deterministic=True))
    rng = np.random.default_rng(1)
    outputs = {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in shapes.items()}
    unlabelled = Targets(**{k: None for k in Targets.__dataclass_fields__ if k != "sample_mask"},
                         sample_mask=targets.sample_mask)
    objective = tiny.spec.objective
    _, statistics = forward_statistics(outputs, unlabelled, tasks=objective.tasks, loss=objective.loss)
    metrics = to_host_metrics(metrics_from_statistics(statistics, tiny.state.log_vars, objective), objective.tasks)
    for name in ORIGINAL:
        assert metrics[f"targets/{name}"] == 0.0, name
        assert np.isfinite(metrics[f"loss/{name}"]), name
    assert metrics["loss/regime"] > 1e-4  # the temporal-consistency term, not the 1e-6 fallback
    assert metrics["regime_accuracy"] is None and metrics["n/regime"] == 0.0


def _forecast_targets(masks, values, sample_mask) -> Targets:
    b = len(sample_mask)
    none = {k: None for k in ("phase_index", "phase_valid", "is_transition", "fatalities", "casualty_valid",
                              "anomaly", "anomaly_valid")}
    return Targets(**none, forecast_targets=np.asarray(values, np.float32), forecast_masks=np.asarray(masks, bool),
                   sample_mask=np.asarray(sample_mask, bool)[:b])


def test_the_next_month_forecast_is_scored_on_one_element_set_by_model_and_baselines():
    """A feature with no training target at all: the model, persistence and climatology are scored on the same
    elements, and the count printed beside them is theirs (the baselines add no count of their own)."""
    rng = np.random.default_rng(0)
    b, m, f = 12, 3, 4
    model = ModelConfig(monthly_sources=(("s", 3), ("t", 1)))
    objective = Objective(tasks=(tasks.get("forecast"),), model=model)
    train_masks = rng.random((b, m, f)) < 0.8
    train_masks[:, -1, 1] = False  # feature 1: never a valid train target at the last position
    train = _forecast_targets(train_masks, rng.normal(size=(b, m, f)), np.ones(b))
    val_masks = rng.random((b, m, f)) < 0.8
    val_masks[:3, -1, 1] = val_masks[:3, -2, 1] = True
    val = _forecast_targets(val_masks, rng.normal(size=(b, m, f)), np.arange(b) < 10)
    pred = rng.normal(size=(b, m, f)).astype(np.float32)

    @jax.jit
    def model_metrics(pred, targets):
        _, stats = forward_statistics({"forecast_pred": pred}, targets, tasks=objective.tasks, loss=objective.loss)
        return metrics_from_statistics(stats, {"forecast": jnp.float32(0.0)}, objective)

    task = tasks.get("forecast")
    climatology = task.fit_baseline(train, model, objective.loss)
    assert climatology[1] == 0.0  # no train data: the normalisation's own value for such a feature
    baselines = task.baseline_metrics(climatology, val, model, objective.loss)
    out = with_baselines(to_host_metrics(model_metrics(pred, val), objective.tasks), baselines, objective.tasks)

    # The numpy oracle: E = real rows x features whose next month and this month are both valid.
    e = (np.arange(b) < 10)[:, None] & val_masks[:, -1] & val_masks[:, -2]
    assert e[:, 1].sum() >= 3  # the feature without train data is in E
    y = np.asarray(val.forecast_targets, np.float64)
    model_mse = np.sum(np.where(e, (pred[:, -1] - y[:, -1]) ** 2, 0)) / e.sum()
    persistence = np.sum(np.where(e, (y[:, -2] - y[:, -1]) ** 2, 0)) / e.sum()
    clim = np.sum(np.where(e, (climatology[None] - y[:, -1]) ** 2, 0)) / e.sum()
    assert out["n/forecast_next"] == e.sum()
    np.testing.assert_allclose(out["forecast_next_mse"], model_mse, rtol=1e-5)
    np.testing.assert_allclose(out["baseline/forecast_persistence_mse"], persistence, rtol=1e-9)
    np.testing.assert_allclose(out["baseline/forecast_climatology_mse"], clim, rtol=1e-9)
    np.testing.assert_allclose(out["skill/forecast"], 1 - model_mse / min(persistence, clim), rtol=1e-5)
    cols = slice(0, 3)  # source "s"
    np.testing.assert_allclose(out["n/forecast_next/s"], e[:, cols].sum())
    np.testing.assert_allclose(out["baseline/forecast_persistence_mse/s"],
                               np.sum(np.where(e[:, cols], (y[:, -2, cols] - y[:, -1, cols]) ** 2, 0))
                               / e[:, cols].sum(), rtol=1e-9)


def test_a_task_of_the_registry_is_named_nowhere_else():
    """Every module outside han_jax/tasks reaches a task through the registry: no task name is written there.

    The batch format's field names (``Targets.anomaly``) are the data's vocabulary, shared by every layer: the
    data pipeline fills them by name.
    """
    import ast
    import os

    import han_jax

    root = os.path.dirname(han_jax.__file__)
    names = set(ORIGINAL) - {f.name for f in dataclasses.fields(Targets)}
    found = []
    for folder, _, files in os.walk(root):
        if os.path.relpath(folder, root).split(os.sep)[0] == "tasks":
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    parts = set(node.value.replace(".", "/").split("/"))
                    if node.value in names or (len(node.value) < 80 and parts & names and "/" in node.value):
                        found.append(f"{os.path.relpath(path, root)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


def test_tasks_are_frozen_values():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tasks.get("regime").prior = 3.0
