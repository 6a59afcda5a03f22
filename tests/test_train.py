"""The CLI on the tiny config: files, comparable phases, learning, exact resume, audit."""

import json
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from han_jax.cli import main

from tests.helpers import TINY_EPOCHS

EPOCHS = str(TINY_EPOCHS)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full"))
    assert main(["train", "--preset", "tiny", "--epochs", EPOCHS, "--run-dir", run_dir, "--quiet"]) == 0
    return run_dir


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _params(run_dir, which="latest"):
    path = os.path.join(run_dir, "checkpoints", which)
    with ocp.CheckpointManager(path) as mngr:
        restored = mngr.restore(mngr.latest_step())
    return restored["state"]["params"]


def test_cli_run_writes_every_file_with_comparable_phases(full_run):
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert os.path.getsize(os.path.join(full_run, name)) > 0, name
    rows = _rows(full_run)
    assert [(r["epoch"], r["phase"]) for r in rows] == [(e, p) for e in range(3) for p in ("train", "val", "test")]
    keys = {tuple(sorted(r["metrics"])) for r in rows}
    assert len(keys) == 1, "every phase must report the same metric keys"
    assert {"weighted_total", "simple_total", "loss/regime", "weight/casualty", "high_obs/weighted_total"} <= set(rows[0]["metrics"])
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
        main(["train", "--preset", "tiny", "--epochs", EPOCHS, "--run-dir", str(tmp_path), "--resume", "--quiet"])


def test_audit_passes_and_shows_the_decomposition(capsys):
    assert main(["audit", "--preset", "tiny", "--epochs", EPOCHS]) == 0
    out = capsys.readouterr().out
    assert "AUDIT PASSED" in out and "DIFFERS" not in out
    assert "weighted_total = data_term + uncertainty_term + reg_term" in out


def test_bad_override_names_the_field():
    with pytest.raises(SystemExit, match="d_modle"):
        main(["audit", "--preset", "tiny", "--set", "model.d_modle=3"])
