"""train/eval/test steps: one shared path, pmap == one device, guards, accumulation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax.config import AggregateConfig, ModelConfig, OptimConfig
from han_jax.steps import StepConfig, create_train_state, jit_steps, pmap_steps
from han_jax.train import replicate
from tests.helpers import random_batch, tiny_step_config

# The step configuration of the tiny CLI run (tests/test_train.py): compiled steps are
# cached per configuration and shape, so both files share one compilation of each step.
CFG = tiny_step_config()
MODEL = CFG.model
B, T, M = 8, 60, 3


@pytest.fixture(scope="module")
def batch():
    return random_batch(MODEL, b=B, t=T, m=M, seed=3, n_real=7)


@pytest.fixture(scope="module")
def state(batch):
    return create_train_state(jax.random.PRNGKey(0), CFG, batch[0])


def _host(tree):
    return jax.device_get(tree)


def test_shared_path_gives_identical_metrics_in_every_phase(state, batch):
    steps = jit_steps(CFG)
    _, train_m = steps.train_deterministic(state, *batch)
    eval_m = steps.eval(state, *batch)
    test_m, preds = steps.test(state, *batch)
    # Same keys: train only adds what only training has.
    assert set(eval_m) == set(test_m)
    assert set(train_m) - set(eval_m) == {"objective", "temporal_reg", "learning_rate", "skipped_step", "grad_norm",
                                          "loss_scale"}
    chex.assert_trees_all_close(_host(eval_m), _host(test_m), rtol=0, atol=0)
    chex.assert_trees_all_close({k: train_m[k] for k in eval_m}, _host(eval_m), rtol=1e-6, atol=1e-7)
    for key in ("weighted_total", "simple_total", "data_term", "uncertainty_term", "reg_term", "n_rows",
                "regime_accuracy", "regime_balanced_accuracy", "casualty_mae", "anomaly_mse", "forecast_mse",
                "transition_positives", "high_obs/weighted_total", "low_obs/weighted_total"):
        assert key in eval_m, key
    for task in CFG.aggregate.task_names:
        assert f"loss/{task}" in eval_m and f"weight/{task}" in eval_m
    assert float(eval_m["n_rows"]) == 7.0
    np.testing.assert_allclose(float(eval_m["weighted_total"]),
                               float(eval_m["data_term"] + eval_m["uncertainty_term"] + eval_m["reg_term"]), rtol=1e-6)
    # Row strata: alternate rows have monthly obs 0.9 / 0.3 in the helper batch; row 7 is padding.
    assert float(eval_m["high_obs/n_rows"]) == 4.0 and float(eval_m["low_obs/n_rows"]) == 3.0
    chex.assert_shape(preds["regime_probs"], (B, MODEL.n_regime_classes))
    np.testing.assert_allclose(np.asarray(preds["regime_probs"]).sum(-1), 1.0, rtol=1e-5)
    assert float(train_m["objective"]) == pytest.approx(float(train_m["weighted_total"]))


def test_train_step_updates_and_dropout_changes_outputs(state, batch):
    steps = jit_steps(CFG)
    new_state, m = steps.train_deterministic(state, *batch)
    assert int(new_state.step) == 1 and float(m["skipped_step"]) == 0.0
    delta = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, state.params)
    assert max(jax.tree_util.tree_leaves(delta)) > 0
    # log-variances move at 10x the model learning rate (the configured multiplier)
    assert any(float(new_state.log_vars[t]) != float(state.log_vars[t]) for t in state.log_vars)
    # Without deterministic=True, dropout is on: the same batch scores differently.
    _, m_drop = steps.train(jax.tree_util.tree_map(jnp.copy, state), *batch)  # train donates its state
    assert float(m_drop["weighted_total"]) != float(m["weighted_total"])

def test_pmap_four_devices_equals_one_device(state, batch):
    n = 4
    inputs, targets = batch
    shard = lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:])
    single_state, single_m = jit_steps(CFG).train_deterministic(state, inputs, targets)
    rep = replicate(state, n)
    p_state, p_m = pmap_steps(CFG).train_deterministic(rep, jax.tree_util.tree_map(shard, inputs),
                                                       jax.tree_util.tree_map(shard, targets))
    first = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
    chex.assert_trees_all_close(first(_host(p_m)), _host(single_m), rtol=2e-5, atol=1e-6)
    # grad_norm (in the metrics above, compared tightly) is the norm of the averaged
    # gradients: it pins the pmean. Parameters get a looser absolute tolerance because
    # attention key biases have an exactly-zero true gradient, and Adam's normalisation
    # turns their ~1e-10 float noise (which depends on reduction order) into ~1e-6 steps.
    chex.assert_trees_all_close(first(_host(p_state.params)), _host(single_state.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(first(_host(p_state.log_vars)), _host(single_state.log_vars), rtol=1e-6, atol=1e-7)
    # eval/test: the same metrics too
    p_eval = pmap_steps(CFG).eval(rep, jax.tree_util.tree_map(shard, inputs), jax.tree_util.tree_map(shard, targets))
    chex.assert_trees_all_close(first(_host(p_eval)), _host(jit_steps(CFG).eval(state, inputs, targets)),
                                rtol=2e-5, atol=1e-6)


def test_nan_in_one_task_is_excluded_and_params_stay_finite(state, batch):
    inputs, targets = batch
    ft = np.array(targets.forecast_targets)
    mask = np.array(targets.forecast_masks)
    ft[0, -1, 0], mask[0, -1, 0] = np.nan, True
    bad = targets.replace(forecast_targets=ft, forecast_masks=mask)
    new_state, m = jit_steps(CFG).train_deterministic(state, inputs, bad)
    assert np.isnan(float(m["loss/forecast"])) and float(m["included/forecast"]) == 0.0
    assert float(m["skipped_step"]) == 0.0 and np.isfinite(float(m["weighted_total"]))
    for leaf in jax.tree_util.tree_leaves(new_state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
    assert any(jax.tree_util.tree_leaves(changed))  # the other tasks still trained


def test_non_finite_gradients_skip_the_update(state, batch):
    poisoned = state.replace(params=jax.tree_util.tree_map(lambda x: x, state.params))
    leaves, treedef = jax.tree_util.tree_flatten(poisoned.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.inf)
    poisoned = poisoned.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))
    new_state, m = jit_steps(CFG).train_deterministic(poisoned, *batch)
    assert float(m["skipped_step"]) == 1.0
    chex.assert_trees_all_equal(_host(new_state.params), _host(poisoned.params))
    chex.assert_trees_all_equal(_host(new_state.opt_state), _host(poisoned.opt_state))
    chex.assert_trees_all_equal(_host(new_state.log_vars), _host(poisoned.log_vars))
    assert int(new_state.step) == int(poisoned.step) + 1


def test_accumulating_four_micro_batches_equals_one_step_on_the_whole_batch(batch):
    """Holds for losses that are plain means over rows; batch statistics (regime class
    weights, variance penalties, loss floors) make micro-batch and whole-batch losses
    differ, so this aggregates the per-row-mean tasks only, with every row valid."""
    tasks = ("transition", "casualty", "daily_forecast")
    inputs, targets = batch
    targets = targets.replace(sample_mask=np.ones(B, bool), phase_valid=np.ones(B, bool),
                              casualty_valid=np.ones(B, bool))
    base = dict(model=MODEL, aggregate=AggregateConfig(task_names=tasks))
    one = StepConfig(**base, optim=OptimConfig(accumulation_steps=1, warmup_epochs=0, num_epochs=5))
    four = StepConfig(**base, optim=OptimConfig(accumulation_steps=4, warmup_epochs=0, num_epochs=5))
    s1 = create_train_state(jax.random.PRNGKey(1), one, inputs)
    s4 = create_train_state(jax.random.PRNGKey(1), four, inputs)
    s1, _ = jit_steps(one).train_deterministic(s1, inputs, targets)
    for i in range(4):
        part = jax.tree_util.tree_map(lambda x: x[2 * i:2 * i + 2], (inputs, targets))
        before = s4.params
        s4, _ = jit_steps(four).train_deterministic(s4, *part)
        if i < 3:
            chex.assert_trees_all_equal(_host(s4.params), _host(before))  # nothing applied mid-accumulation
    # Same tolerance as the pmap test: zero-true-gradient key biases move by Adam-amplified noise.
    chex.assert_trees_all_close(_host(s4.params), _host(s1.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(s4.log_vars), _host(s1.log_vars), rtol=1e-6, atol=1e-7)


def test_learning_rate_schedule_is_the_originals():
    from han_jax.steps import learning_rate_schedule

    sched = learning_rate_schedule(OptimConfig())  # lr 1e-4, warmup 10 epochs of 200, min 1e-6
    np.testing.assert_allclose(float(sched(0)), 1e-6, rtol=1e-5)  # lr * 0.01
    np.testing.assert_allclose(float(sched(5)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)
    np.testing.assert_allclose(float(sched(10)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(105)), 1e-6 + (1e-4 - 1e-6) * 0.5, rtol=1e-4)
    np.testing.assert_allclose(float(sched(200)), 1e-6, rtol=1e-4)
    short = learning_rate_schedule(OptimConfig(num_epochs=3))  # effective warmup min(10, max(1, 2)) = 2
    np.testing.assert_allclose(float(short(1)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)


def test_train_only_temporal_regulariser_and_source_dropout(batch):
    """Both train-only extras (off by default): the regulariser is added to the objective and
    reported apart; source dropout zeroes a monthly source's features and masks for the batch."""
    from han_jax.config import RegularizationConfig

    reg = RegularizationConfig(temporal_reg=True, source_dropout=True, source_dropout_prob=1.0,
                               source_dropout_sources=("hdx_conflict",))
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(MODEL, dropout=0.0), regularization=reg)
    inputs, targets = batch
    state = create_train_state(jax.random.PRNGKey(2), cfg, inputs)
    steps = jit_steps(cfg)
    _, m = steps.train(jax.tree_util.tree_map(jnp.copy, state), inputs, targets)
    assert float(m["temporal_reg"]) > 0
    np.testing.assert_allclose(float(m["objective"]), float(m["weighted_total"] + m["temporal_reg"]), rtol=1e-6)
    dropped = inputs.replace(
        monthly_features={**inputs.monthly_features, "hdx_conflict": np.zeros_like(inputs.monthly_features["hdx_conflict"])},
        monthly_masks={**inputs.monthly_masks, "hdx_conflict": np.zeros_like(inputs.monthly_masks["hdx_conflict"])},
    )
    # With model dropout 0, train sees exactly what eval sees on the dropped inputs ...
    np.testing.assert_allclose(float(m["weighted_total"]), float(steps.eval(state, dropped, targets)["weighted_total"]),
                               rtol=1e-5)
    # ... and eval itself never drops a source.
    assert float(steps.eval(state, inputs, targets)["weighted_total"]) != float(m["weighted_total"])
