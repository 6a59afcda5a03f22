"""Configuration checks before any data or JAX work: one line, exit status 2, no traceback, no file written."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_jax import config as configs
from han_jax.app.validation import validate_config
from han_jax.cli import main
from han_jax.config import ConfigError
from han_jax.core.precision import make_loss_scale
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import TrainState, current_learning_rate, make_optimizer, start_epoch

TINY = ["train", "--preset", "tiny", "--quiet", "--no-tensorboard"]


def _run_error(capsys, argv, run_dir=None):
    """``main(argv)``'s exit status and its one stderr line; the run folder must not have been created."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    if run_dir is not None:
        assert not os.path.exists(run_dir), os.listdir(run_dir)
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "train.epochs=0: expected an integer >= 1"),
    (["--batch-size", "0"], "train.batch_size=0: expected an integer >= 1"),
    (["--devices", "3"], "train.batch_size=8: expected a multiple of train.num_devices=3"),
    (["--devices", "0"], "train.num_devices=0: expected an integer >= 1"),
    (["--patience", "0"], "train.patience=0"),
    (["--stop-after-epoch", "-1"], "--stop-after-epoch=-1"),
    (["--policy", "f8"], "--policy='f8'"),
    (["--set", "model.d_modle=3"], "d_modle"),
    (["--set", "model.nhead=3"], "model.d_model=16: expected a multiple of model.nhead=3"),
    (["--set", "model.dropout=1.5"], "model.dropout=1.5: expected a number in [0, 1)"),
    (["--set", "step.optim.learning_rate=0"], "step.optim.learning_rate=0.0: expected a number > 0"),
    (["--set", "step.optim.min_lr=0.1"], "step.optim.min_lr=0.1: expected at most step.optim.learning_rate=0.001"),
    (["--set", "step.optim.accumulation_steps=0"], "step.optim.accumulation_steps=0"),
    (["--set", "step.optim.schedule_unit=batch"], "step.optim.schedule_unit='batch'"),
    (["--set", "step.aggregate.strategy=mean"], "step.aggregate.strategy='mean'"),
    (["--set", "step.loss.phase_to_coarse=[0,1,2,3,4,5,6,7,8,9,10]"], "step.loss.phase_to_coarse="),
    (["--set", "step.rng_impl=mersenne"], "step.rng_impl='mersenne'"),
    (["--set", "data.daily_seq_len=0"], "data.daily_seq_len=0: expected an integer >= 1"),
    (["--set", "data.monthly_seq_len=99"], "data.monthly_seq_len=99: expected at most model.max_months=60"),
    (["--set", "data.val_sample_stride=0"], "val_sample_stride=0"),
    (["--set", "data.val_ratio=0.9"], "data.test_ratio=0.15: expected data.val_ratio + data.test_ratio < 1"),
    (["--set", "data.daily_sources=[]"], "data.daily_sources=()"),
    (["--set", "data.mode=chaotic"], "chaotic"),
    # Needs the data (the tiny world has 300 days): still one line, before anything is compiled or written.
    (["--set", "data.daily_seq_len=400"], "daily_seq_len=400 is longer than the data"),
])
def test_train_rejects_bad_values_in_one_line_without_writing(capsys, tmp_path, args, expected):
    run_dir = str(tmp_path / "run")
    line = _run_error(capsys, TINY + args + ["--run-dir", run_dir], run_dir)
    assert line.startswith("han-jax train: error: ") and expected in line, line


@pytest.mark.parametrize("argv, expected", [
    (["audit", "--preset", "tiny", "--epochs", "0"], "han-jax audit: error: train.epochs=0"),
    (["evaluate", "--run-dir", "nowhere", "--batch-size", "0"], "han-jax evaluate: error: --batch-size=0"),
    (["evaluate", "--run-dir", "nowhere", "--batch-size", "8", "--devices", "3"], "--batch-size=8: expected a "
                                                                                 "multiple of --devices=3"),
    (["evaluate", "--run-dir", "nowhere"], "han-jax evaluate: error: nowhere/config.json: not found"),
    (["predict", "--run-dir", "nowhere", "--batch-size", "0"], "han-jax predict: error: --batch-size=0"),
    (["predict", "--run-dir", "nowhere", "--set", "model.d_model=8"], "predict changes only where the data is"),
    (["import-torch", "missing.pt", "--run-dir", "nowhere"], "han-jax import-torch: error: missing.pt: no such file"),
])
def test_every_command_reports_user_errors_in_one_line(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _run_error(capsys, argv)
    assert not os.listdir(tmp_path)


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^train\.epochs=0: expected an integer >= 1$"):
        main(["--debug"] + TINY + ["--epochs", "0", "--run-dir", run_dir])
    with pytest.raises(ConfigError, match="train.batch_size=0"):
        main(TINY + ["--batch-size", "0", "--run-dir", run_dir, "--debug"])
    assert not os.path.exists(run_dir)


@pytest.mark.integration
def test_the_command_line_exits_2_without_a_traceback_and_debug_shows_it(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "han_jax.cli"]
    plain = subprocess.run(cmd + TINY + ["--epochs", "0", "--run-dir", run_dir], capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr == "han-jax train: error: train.epochs=0: expected an integer >= 1\n"
    debug = subprocess.run(cmd + ["--debug"] + TINY + ["--epochs", "0", "--run-dir", run_dir], capture_output=True,
                           text=True)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.rstrip().endswith("train.epochs=0: expected an integer >= 1")
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize("preset", sorted(configs.PRESETS))
def test_every_preset_is_valid_and_stays_valid_through_config_json(preset):
    config = configs.get_config(preset)
    validate_config(config)
    validate_config(configs.config_from_dict(json.loads(json.dumps(configs.config_to_dict(config)))))


@settings(max_examples=60, deadline=None)
@given(preset=st.sampled_from(sorted(configs.PRESETS)), epochs=st.integers(1, 500),
       warmup=st.integers(0, 50), devices=st.integers(1, 8), rows_per_device=st.integers(1, 16))
def test_valid_training_settings_pass(preset, epochs, warmup, devices, rows_per_device):
    config = configs.get_config(preset)
    optim = dataclasses.replace(config.step.optim, warmup_epochs=warmup)
    config = config.replace(step=dataclasses.replace(config.step, optim=optim),
                            train=dataclasses.replace(config.train, epochs=epochs, num_devices=devices,
                                                      batch_size=devices * rows_per_device))
    validate_config(config)


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["epochs", "batch_size", "patience", "num_devices"]),
       value=st.one_of(st.integers(-5, 0), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)))
def test_a_bad_train_value_is_one_line_naming_it(field, value):
    config = configs.tiny()
    config = config.replace(train=dataclasses.replace(config.train, **{field: value}))
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.") and "expected" in message
    # Names the bad field, or the batch size it must divide.
    assert message.startswith((f"train.{field}=", "train.batch_size="))


def test_a_one_epoch_run_builds_its_optimiser_and_updates_at_the_peak_rate():
    """``--epochs 1`` on the tiny preset died building the optimiser (a cosine of length 0). The whole optimiser
    path of a one-epoch run, without the model compile a full run would add."""
    config = configs.tiny()
    config = config.replace(train=dataclasses.replace(config.train, epochs=1),
                            model=dataclasses.replace(config.model, daily_sources=configs.SMALL_DAILY_SOURCES,
                                                      monthly_sources=configs.SMALL_MONTHLY_SOURCES))
    validate_config(config)
    spec = StepSpec.of(config)
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    log_vars = spec.objective.init_log_vars()
    tx = make_optimizer(spec)
    state = TrainState(step=jnp.int32(0), params=params, log_vars=log_vars,
                       opt_state=tx.init({"model": params, "log_vars": log_vars}),
                       loss_scale=make_loss_scale(spec.policy), rng=jax.random.PRNGKey(0))
    state = start_epoch(state, jnp.int32(0), Schedule.of(config.step.optim, epochs=1), spec=spec)
    assert float(current_learning_rate(state.opt_state)) == pytest.approx(config.step.optim.learning_rate)
    grads = {"model": jax.tree_util.tree_map(jnp.ones_like, params),
             "log_vars": jax.tree_util.tree_map(jnp.ones_like, log_vars)}
    updates, _ = tx.update(grads, state.opt_state, {"model": params, "log_vars": log_vars})
    assert float(jnp.abs(updates["model"]["w"]).max()) > 0
