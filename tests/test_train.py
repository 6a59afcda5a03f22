"""The CLI on the tiny config: files, comparable phases, learning, exact resume, audit."""

import json
import os

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from han_jax import tasks
from han_jax.app.train import collapse_warning
from han_jax.cli import main
from han_jax.config import ConfigError
from tests.helpers import TINY_EPOCHS

EPOCHS = str(TINY_EPOCHS)


@pytest.fixture(scope="module")
def full_run(tiny_run_dir):
    # `han-jax train --preset tiny --epochs EPOCHS` (tests/conftest.py), shared with the run-folder tests.
    return tiny_run_dir


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _params(run_dir, which="latest"):
    path = os.path.join(run_dir, "checkpoints", which)
    with ocp.CheckpointManager(path) as mngr:
        restored = mngr.restore(mngr.latest_step())
    return restored["state"]["params"]


def test_cli_run_writes_every_file_with_comparable_phases(full_run):
    for name in ("config.json", "resolved.json", "norm_stats.npz", "layout.json", "metrics.jsonl", "summary.json",
                 "curves.png", "predictions.csv", "forecast.png"):
        assert os.path.getsize(os.path.join(full_run, name)) > 0, name
    rows = _rows(full_run)
    assert [(r["epoch"], r["phase"]) for r in rows] == [(e, p) for e in range(3) for p in ("train", "val", "test")]
    keys = {tuple(sorted(r["metrics"])) for r in rows}
    assert len(keys) == 1, "every phase must report the same metric keys"
    assert {"weighted_total", "simple_total", "loss/regime", "weight/casualty",
            "high_obs/weighted_total"} <= set(rows[0]["metrics"])
    assert {"objective", "learning_rate", "skipped_step"} <= set(rows[0]["extra"])
    summary = json.load(open(os.path.join(full_run, "summary.json")))
    assert set(summary["final"]) == {"train", "val", "test"}
    assert summary["final"]["train"].keys() == summary["final"]["test"].keys()
    # The log-variance terms do not depend on the data: equal across splits.
    vals = [summary["final"][s]["uncertainty_term"] for s in ("train", "val", "test")]
    np.testing.assert_allclose(vals, vals[0])
    assert summary["dataset_sizes"]["train"] == int(summary["final"]["train"]["n_rows"])


def test_loss_decreases_on_learnable_synthetic_data(full_run):
    train = [r["metrics"] for r in _rows(full_run) if r["phase"] == "train"]
    # About 19 optimiser steps an epoch on the small preset: a few dozen steps in all.
    assert train[-1]["weighted_total"] < train[0]["weighted_total"] - 0.05
    assert train[-1]["simple_total"] < train[0]["simple_total"]


def test_resume_is_exact(full_run, tmp_path):
    run_dir = str(tmp_path / "resumed")
    common = ["train", "--preset", "tiny", "--epochs", EPOCHS, "--run-dir", run_dir, "--quiet"]
    assert main(common + ["--stop-after-epoch", "1"]) == 0
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    assert main(common + ["--resume"]) == 0
    chex.assert_trees_all_equal(_params(run_dir), _params(full_run))
    a, b = _rows(run_dir), _rows(full_run)
    assert [(r["epoch"], r["phase"]) for r in a] == [(r["epoch"], r["phase"]) for r in b]
    np.testing.assert_allclose([r["metrics"]["weighted_total"] for r in a],
                               [r["metrics"]["weighted_total"] for r in b], rtol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        main(["--debug", "train", "--preset", "tiny", "--epochs", EPOCHS, "--run-dir", str(tmp_path), "--resume",
              "--quiet"])


def test_audit_passes_and_shows_the_decomposition(capsys):
    assert main(["audit", "--preset", "tiny", "--epochs", EPOCHS]) == 0
    out = capsys.readouterr().out
    assert "AUDIT PASSED" in out and "DIFFERS" not in out
    assert "weighted_total = data_term + uncertainty_term + reg_term" in out


def test_bad_override_names_the_field():
    with pytest.raises(ConfigError, match="d_modle"):
        main(["audit", "--preset", "tiny", "--set", "model.d_modle=3", "--debug"])


def test_summary_and_metrics_carry_baselines_skill_and_target_counts(full_run):
    summary = json.load(open(os.path.join(full_run, "summary.json")))
    for split, m in summary["final"].items():
        for key in ("baseline/regime_balanced_accuracy", "baseline/forecast_persistence_mse",
                    "baseline/forecast_climatology_mse", "forecast_next_mse", "skill/regime", "skill/forecast",
                    "targets/regime", "targets/daily_forecast"):
            assert key in m, (split, key)
        assert m["targets/daily_forecast"] == 0  # the tiny preset's latent daily forecast has no targets
        best = min(m["baseline/forecast_persistence_mse"], m["baseline/forecast_climatology_mse"])
        np.testing.assert_allclose(m["skill/forecast"], 1 - m["forecast_next_mse"] / best, rtol=1e-9)
        np.testing.assert_allclose(m["skill/regime"], 1 - (1 - m["regime_balanced_accuracy"])
                                   / (1 - m["baseline/regime_balanced_accuracy"]), rtol=1e-9)
    rows = _rows(full_run)
    assert all("skill/forecast" in r["metrics"] for r in rows)


@pytest.mark.integration
def test_evaluate_gives_the_same_numbers_at_any_batch_size_and_device_count(full_run, tmp_path):
    """Exact split metrics: batch size 1, 3 and one batch holding the whole (largest) split, and
    4 devices sharded (the default) and pmapped, agree to float rounding on every metric of every split."""
    import subprocess
    import sys

    runs = (("b1", ["--batch-size", "1"]), ("b3", ["--batch-size", "3"]), ("whole", ["--batch-size", "151"]),
            ("dev4", ["--batch-size", "4", "--devices", "4"]),
            ("pmap4", ["--batch-size", "8", "--devices", "4", "--parallel", "pmap"]))
    # As a user runs it, in a fresh process (the 4 host devices come from conftest's XLA_FLAGS):
    # one process for the four evaluations, so they share its start and the model's init.
    calls = [["evaluate", "--run-dir", full_run, "--out", str(tmp_path / f"{name}.json")] + extra
             for name, extra in runs]
    script = "import sys; from han_jax.cli import main; sys.exit(max(main(a) for a in %r))" % (calls,)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact split metrics" in done.stdout
    assert "4 device(s), sharded)" in done.stdout and "4 device(s), pmap)" in done.stdout
    results = {name: json.load(open(tmp_path / f"{name}.json")) for name, _ in runs}
    summary = json.load(open(os.path.join(full_run, "summary.json")))
    assert results["whole"]["train"]["n_rows"] == summary["dataset_sizes"]["train"] == 151
    reference = results["whole"]
    for name, result in results.items():
        for split in ("train", "val", "test"):
            assert result[split].keys() == reference[split].keys()
            for key, value in reference[split].items():
                got = result[split][key]
                if value is None:
                    assert got is None, (name, split, key)
                else:
                    np.testing.assert_allclose(got, value, rtol=2e-5, atol=1e-6, err_msg=f"{name} {split} {key}")
    # The run's own final scoring (batch size 8) is the same evaluation.
    for split in ("val", "test"):
        np.testing.assert_allclose(summary["final"][split]["weighted_total"], reference[split]["weighted_total"],
                                   rtol=2e-5)


def test_collapse_warning_speaks_only_of_watched_tasks_with_targets():
    metrics = {"loss/regime": 0.5, "targets/regime": 10.0, "loss/anomaly": 1e-6, "targets/anomaly": 0.0,
               "loss/forecast": 2e-4, "targets/forecast": 30.0, "loss/casualty": 1e-5, "targets/casualty": 9.0}
    # casualty is not one of the tasks the original watched (Task.watch_collapse).
    assert collapse_warning(metrics, tasks.tasks()) == "COLLAPSE WARNING: task losses below 0.001: forecast=0.000200"
    assert collapse_warning({**metrics, "loss/forecast": 0.5}, tasks.tasks()) is None
