"""Self-describing run folders: config, normalisation and layout round trips, load_run, predictions.csv, TensorBoard."""

import csv
import dataclasses
import glob
import json
import os
import shutil
import struct

import chex
import jax
import numpy as np
import pytest

from han_jax.app.evaluate import evaluate_split
from han_jax.app.runs import load_run, write_run_folder
from han_jax.app.summaries import open_writer
from han_jax.config import Resolved, config_from_dict
from han_jax.data import DataLayout, Normalisation, iterate_batches, make_world
from han_jax.training.steps import row_predictions
from tests.helpers import TINY_EPOCHS, tiny_config


@pytest.fixture(scope="module")
def run(tiny_run_dir):
    return load_run(tiny_run_dir)


@pytest.fixture(scope="module")
def datasets(tiny):
    return tiny.datasets


def test_run_folder_rebuilds_config_normalisation_and_layout(tiny_run_dir, run, datasets, tiny):
    # What the user asked for and what the data gave, apart.
    with open(os.path.join(tiny_run_dir, "config.json")) as f:
        assert config_from_dict(json.load(f)) == tiny_config()
    with open(os.path.join(tiny_run_dir, "resolved.json")) as f:
        assert config_from_dict(json.load(f), Resolved) == tiny.resolved
    assert run.config == tiny_config() and run.resolved == tiny.resolved and run.spec == tiny.spec
    assert run.config.model.daily_sources is None  # the model takes the data's layout
    with np.load(os.path.join(tiny_run_dir, "norm_stats.npz")) as arrays:
        saved = Normalisation.from_arrays(dict(arrays))
    want = datasets.normalisation
    assert saved.count_transform == want.count_transform == tiny_config().data.count_transform
    for kind in ("daily", "monthly"):
        got_stats, want_stats = getattr(saved.stats, kind), getattr(want.stats, kind)
        assert list(got_stats.mean) == list(want_stats.mean)
        chex.assert_trees_all_equal(got_stats.mean, want_stats.mean)
        chex.assert_trees_all_equal(got_stats.std, want_stats.std)
    chex.assert_trees_all_equal(saved.transformed, want.transformed)
    with open(os.path.join(tiny_run_dir, "layout.json")) as f:
        layout = DataLayout.from_dict(json.load(f))
    assert layout == run.layout == datasets.layout
    assert layout.model_layout() == {"daily_sources": run.spec.model.daily_sources,
                                     "monthly_sources": run.spec.model.monthly_sources}
    assert layout.features("monthly")["sentinel"][0] == "s1_radar"


def test_forward_equals_the_saved_state_s_test_step(tiny_run_dir, run, datasets, tiny):
    inputs, targets = next(iterate_batches(datasets.test, run.config.train.batch_size))
    expected = jax.device_get(tiny.steps.test(run.state, inputs, targets).predictions)
    got = jax.device_get(row_predictions(run.forward(inputs), run.spec))
    assert set(expected) - {"sample_mask"} == set(got)
    chex.assert_trees_all_close(got, {k: v for k, v in expected.items() if k != "sample_mask"}, rtol=1e-6, atol=1e-6)
    # The state is the best checkpoint: it scores the run's own final numbers.
    metrics, _ = evaluate_split(tiny.steps.test, run.state, datasets.val, 8, spec=run.spec)
    summary = json.load(open(os.path.join(tiny_run_dir, "summary.json")))
    np.testing.assert_allclose(metrics["weighted_total"], summary["final"]["val"]["weighted_total"], rtol=1e-6)


def test_a_run_written_before_the_change_is_a_clear_error(tiny_run_dir, tmp_path):
    old = tmp_path / "old_run"
    shutil.copytree(tiny_run_dir, old)
    os.remove(old / "norm_stats.npz")
    os.remove(old / "layout.json")
    with pytest.raises(FileNotFoundError, match=r"no norm_stats\.npz or layout\.json; .*written before"):
        load_run(str(old))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="checkpoint 'newest'"):
        load_run(tiny_run_dir, "newest")


def test_a_run_folder_without_resolved_json_reads_it_from_its_config(tiny_run_dir, tmp_path, run):
    """Folders written before resolved.json held the data-derived values inside config.json."""
    old = tmp_path / "older_run"
    shutil.copytree(tiny_run_dir, old)
    os.remove(old / "resolved.json")
    with open(old / "config.json") as f:
        data = json.load(f)
    data["model"]["daily_sources"] = [list(x) for x in run.resolved.daily_sources]
    data["model"]["monthly_sources"] = [list(x) for x in run.resolved.monthly_sources]
    data["step"]["optim"]["steps_per_epoch"] = run.resolved.steps_per_epoch
    with open(old / "config.json", "w") as f:
        json.dump(data, f)
    again = load_run(str(old))
    assert again.resolved.tasks is None  # not recorded then: the registry's tasks are loaded
    assert dataclasses.replace(again.resolved, tasks=run.resolved.tasks) == run.resolved and again.spec == run.spec


def test_write_run_folder_round_trips_a_state(run, tmp_path):
    out = str(tmp_path / "written")
    write_run_folder(out, run.config, run.resolved, run.state, run.normalisation, run.layout)
    again = load_run(out, "latest")
    assert again.config == run.config and again.resolved == run.resolved and again.layout == run.layout
    chex.assert_trees_all_equal(jax.device_get(again.state.params), jax.device_get(run.state.params))
    assert not glob.glob(os.path.join(out, ".*.tmp")), "atomic writes leave no temporary file"
    with pytest.raises(FileExistsError, match="expected a new run folder"):
        write_run_folder(out, run.config, run.resolved, run.state, run.normalisation, run.layout)


def _csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_train_writes_predictions_csv_and_forecast_png(tiny_run_dir, run, datasets, tiny):
    header, rows = _csv(os.path.join(tiny_run_dir, "predictions.csv"))
    assert os.path.getsize(os.path.join(tiny_run_dir, "forecast.png")) > 0
    assert header[:3] == ["date", "split", "forecast_month"]
    for name in ("regime_prob/0", "regime_prob/3", "regime_class", "actual/regime_class", "transition_prob",
                 "actual/transition", "expected_fatalities", "zinb_pi", "zinb_mu", "zinb_theta", "actual/fatalities",
                 "anomaly_score", "actual/anomaly"):
        assert name in header, name
    features = [(s, f) for s, feats in run.layout.monthly for f in feats]
    for src, feat in features:
        i = header.index(f"forecast/{src}/{feat}")
        assert header[i + 1] == f"actual/{src}/{feat}"
    # The latent daily head forecasts no feature.
    assert not any(h.startswith("daily_forecast/") for h in header)
    col = {name: i for i, name in enumerate(header)}
    splits = [r[col["split"]] for r in rows]
    assert splits == ["train"] * len(datasets.train) + ["val"] * len(datasets.val) + ["test"] * len(datasets.test)
    # The test rows are the test step's predictions of the best state.
    test_rows = [r for r in rows if r[col["split"]] == "test"]
    inputs, targets = next(iterate_batches(datasets.test, 8))
    preds = jax.device_get(tiny.steps.test(run.state, inputs, targets).predictions)
    got = np.array([float(r[col["expected_fatalities"]]) for r in test_rows[:8]])
    np.testing.assert_allclose(got, preds["expected_fatalities"], rtol=1e-6)
    # Actual values beside the predictions, in the data's units: the world's raw monthly value.
    world = make_world(tiny_config().data)
    table = world.monthly["sentinel"]
    r = test_rows[0]
    month = np.datetime64(r[col["forecast_month"]], "D")
    raw = table.values[np.flatnonzero(table.dates == month)[0], 0]
    np.testing.assert_allclose(float(r[col["actual/sentinel/s1_radar"]]), raw, rtol=1e-6)
    assert r[col["date"]] == str(datasets.calendar.day_dates[datasets.test.anchors[0]])


def _event_scalars(log_dir):
    """{(tag, step): value} from TensorBoard event files (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_run_dir):
    pytest.importorskip("tensorboardX")
    scalars = _event_scalars(os.path.join(tiny_run_dir, "tensorboard"))
    rows = [json.loads(line) for line in open(os.path.join(tiny_run_dir, "metrics.jsonl"))]
    assert {r["epoch"] for r in rows} == set(range(TINY_EPOCHS))
    assert ("val/regime_balanced_accuracy", TINY_EPOCHS - 1) in scalars and ("train/loss/regime", 0) in scalars
    for r in rows:
        for key, value in {**r["metrics"], **r["extra"]}.items():
            # Per-class lists: one tag per class.
            items = {f"{key}/{i}": v for i, v in enumerate(value)} if isinstance(value, list) else {key: value}
            for name, v in items.items():
                tag = (f"{r['phase']}/{name}", r["epoch"])
                if v is None:
                    assert tag not in scalars
                    continue
                # Event files store float32.
                np.testing.assert_allclose(scalars.pop(tag), np.float32(v), rtol=1e-7, err_msg=str(tag))
    assert not scalars, f"event files hold scalars metrics.jsonl does not: {sorted(scalars)[:5]}"


def test_without_tensorboardx_a_run_says_so_once_and_writes_nothing(tmp_path, monkeypatch):
    import sys

    lines = []
    assert open_writer(str(tmp_path), enabled=False, log=lines.append) is None and lines == []
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what an absent package looks like to import
    assert open_writer(str(tmp_path), enabled=True, log=lines.append) is None
    assert len(lines) == 1 and "tensorboardX is not installed" in lines[0]
    assert not os.path.exists(tmp_path / "tensorboard")
