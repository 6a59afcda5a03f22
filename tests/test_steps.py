"""train/eval/test steps: one shared path, sharded jit == pmap == one device, guards, accumulation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from han_jax.config import AggregateConfig, OptimConfig, StepConfig, TrainConfig
from han_jax.parallel import make_parallel, replicate
from han_jax.steps import (
    create_train_state,
    from_optimizer_view,
    jit_steps,
    make_optimizer,
    optimizer_view,
    pmap_steps,
    with_flat_accumulator,
    with_tree_accumulator,
)
from han_jax.testing import compiled_kernels, random_batch
from tests.helpers import tiny_run_config

# The step configuration of the tiny CLI run (tests/test_train.py): compiled steps are
# cached per configuration and shape, so both files share one compilation of each step.
CFG = tiny_run_config()
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
    eval_out, test_out = steps.eval(state, *batch), steps.test(state, *batch)
    eval_m, test_m, preds = eval_out.metrics, test_out.metrics, test_out.predictions
    assert eval_out.predictions == {}  # one return shape: EvalOutput(metrics, statistics, predictions)
    chex.assert_trees_all_close(_host(eval_out.statistics), _host(test_out.statistics), rtol=0, atol=0)
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
    for task in CFG.step.aggregate.task_names:
        assert f"loss/{task}" in eval_m and f"weight/{task}" in eval_m and f"contribution/{task}" in eval_m
    np.testing.assert_allclose(float(eval_m["data_term"] + eval_m["uncertainty_term"]),
                               sum(float(eval_m[f"contribution/{t}"]) for t in CFG.step.aggregate.task_names),
                               rtol=1e-5)
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
    p_eval = pmap_steps(CFG).eval(rep, jax.tree_util.tree_map(shard, inputs),
                                  jax.tree_util.tree_map(shard, targets))
    one_eval = jit_steps(CFG).eval(state, inputs, targets)
    chex.assert_trees_all_close(first(_host(p_eval.metrics)), _host(one_eval.metrics), rtol=2e-5, atol=1e-6)


def test_sharded_jit_on_four_devices_equals_one_device_with_dropout(state, batch):
    """The default multi-device path: the global view draws one device's dropout bits, so even a
    training step with dropout on gives one device's metrics and parameters."""
    parallel = make_parallel(TrainConfig(num_devices=4, batch_size=B))
    assert parallel.kind == "sharded" and parallel.num_devices == 4
    on_rows = jax.device_put(batch, parallel.rows)
    assert on_rows[0].month_boundaries.sharding.spec == parallel.rows.spec
    assert len(on_rows[1].sample_mask.addressable_shards) == 4  # each device holds 2 of the 8 rows
    one_state, one_m = jit_steps(CFG).train(jax.tree_util.tree_map(jnp.copy, state), *batch)
    s_state, s_m = parallel.steps(CFG).train(parallel.put_state(state), *on_rows)
    assert s_state.params is not None and s_m["weighted_total"].sharding.is_fully_replicated
    chex.assert_trees_all_close(_host(s_m), _host(one_m), rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(_host(s_state.params), _host(one_state.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(s_state.log_vars), _host(one_state.log_vars), rtol=1e-6, atol=1e-7)
    # The sharded eval/test steps, and pmap against them, on every split: tests/test_train.py (evaluate).


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
    # optax.apply_if_finite: the moments and the accumulation inside are untouched; it counts the skip.
    chex.assert_trees_all_equal(_host(new_state.opt_state.inner_state), _host(poisoned.opt_state.inner_state))
    assert int(new_state.opt_state.total_notfinite) == int(poisoned.opt_state.total_notfinite) + 1
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
    def config(accumulation_steps):
        step = StepConfig(aggregate=AggregateConfig(task_names=tasks),
                          optim=OptimConfig(accumulation_steps=accumulation_steps, warmup_epochs=0))
        return CFG.replace(step=step, train=TrainConfig(epochs=5))

    one, four = config(1), config(4)
    s1 = create_train_state(jax.random.PRNGKey(1), one, inputs)
    s4 = create_train_state(jax.random.PRNGKey(1), four, inputs)
    s1, _ = jit_steps(one).train_deterministic(s1, inputs, targets)
    for i in range(4):
        part = jax.tree_util.tree_map(lambda x, i=i: x[2 * i:2 * i + 2], (inputs, targets))
        before = s4.params
        s4, _ = jit_steps(four).train_deterministic(s4, *part)
        if i < 3:
            chex.assert_trees_all_equal(_host(s4.params), _host(before))  # nothing applied mid-accumulation
    # Same tolerance as the pmap test: zero-true-gradient key biases move by Adam-amplified noise.
    chex.assert_trees_all_close(_host(s4.params), _host(s1.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(s4.log_vars), _host(s1.log_vars), rtol=1e-6, atol=1e-7)


def test_the_trees_are_rebuilt_from_the_flat_vectors_with_one_kernel_per_leaf_shape():
    """from_optimizer_view slices at run-time offsets: its values are ravel_pytree's, and leaves of one
    shape share a compiled kernel (static offsets gave one kernel per leaf, issue 15's fourth round)."""
    rng = np.random.default_rng(0)
    like = {"model": {f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                                     "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)} for i in range(6)},
            "log_vars": {"regime": jnp.float32(0.5), "casualty": jnp.float32(-0.25)}}
    flat = optimizer_view(like)
    for group, tree in like.items():
        chex.assert_trees_all_equal(from_optimizer_view(flat, like)[group], ravel_pytree(tree)[1](flat[group]))
    rebuild = jax.jit(lambda flat: from_optimizer_view(jax.tree.map(lambda v: v * 2.0, flat), like))
    chex.assert_trees_all_close(rebuild(flat), jax.tree.map(lambda x: x * 2.0, like))
    fusions, kernels = compiled_kernels(rebuild.lower(flat).compile().as_text(), op_name="dynamic_slice")
    assert fusions >= 12, fusions  # the model group's 12 leaves are each sliced out of its vector
    assert kernels <= 3, (fusions, kernels)  # (3, 4), (4,), () shapes: not one kernel per leaf
    with pytest.raises(ValueError, match="'model': expected a float32\\[96\\] vector"):  # dynamic_slice would clamp
        from_optimizer_view({**flat, "model": flat["model"][:-1]}, like)


def test_the_optimiser_on_flat_group_vectors_is_the_same_update_as_on_the_trees(state):
    """train_step hands optax one vector per group (optimizer_view); optax on the parameter trees is the reference.

    Five micro-batches of random gradients (one accumulated update of four, one more accumulating), a
    weight decay that reads the parameters, and the gradient clip (gradients far above max_grad_norm).
    """
    import optax

    cfg = CFG.replace(step=dataclasses.replace(CFG.step, optim=OptimConfig(accumulation_steps=4)))
    tx = make_optimizer(cfg)
    update = jax.jit(tx.update)  # the tree path run eagerly dispatches several ops per leaf
    trees = {"model": state.params, "log_vars": state.log_vars}
    flat = optimizer_view(trees)
    chex.assert_trees_all_equal(from_optimizer_view(flat, trees), trees)
    assert set(flat) == {"model", "log_vars"} and all(v.ndim == 1 for v in flat.values())
    tree_state, flat_state = tx.init(trees), tx.init(flat)
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    for i in range(5):
        keys = jax.random.split(jax.random.PRNGKey(i), len(leaves))
        grads = jax.tree_util.tree_unflatten(treedef, [10.0 * jax.random.normal(k, x.shape) for k, x in
                                                       zip(keys, leaves)])
        updates, tree_state = update(grads, tree_state, trees)
        trees = optax.apply_updates(trees, updates)
        flat_updates, flat_state = update(optimizer_view(grads), flat_state, flat)
        flat = optax.apply_updates(flat, flat_updates)
    assert int(flat_state.inner_state.gradient_step) == 1 and int(flat_state.inner_state.mini_step) == 1
    chex.assert_trees_all_close(from_optimizer_view(flat, trees), trees, rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(flat["model"]), np.asarray(optimizer_view(
        {"model": state.params, "log_vars": state.log_vars})["model"]))  # the update moved the parameters
    # The tree layout is what checkpoints of earlier han-jax versions hold: it converts to the flat one.
    legacy = state.replace(params=trees["model"], log_vars=trees["log_vars"], opt_state=tree_state)
    current = state.replace(params=trees["model"], log_vars=trees["log_vars"], opt_state=flat_state)
    chex.assert_trees_all_close(_host(with_flat_accumulator(legacy).opt_state), _host(current.opt_state),
                                rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(_host(with_flat_accumulator(with_tree_accumulator(current))), _host(current))


def test_learning_rate_schedule_is_the_originals():
    from han_jax.steps import learning_rate_schedule

    sched = learning_rate_schedule(OptimConfig(), num_epochs=200)  # lr 1e-4, warmup 10 epochs of 200, min 1e-6
    np.testing.assert_allclose(float(sched(0)), 1e-6, rtol=1e-5)  # lr * 0.01
    np.testing.assert_allclose(float(sched(5)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)
    np.testing.assert_allclose(float(sched(10)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(105)), 1e-6 + (1e-4 - 1e-6) * 0.5, rtol=1e-4)
    np.testing.assert_allclose(float(sched(200)), 1e-6, rtol=1e-4)
    short = learning_rate_schedule(OptimConfig(), num_epochs=3)  # effective warmup min(10, max(1, 2)) = 2
    np.testing.assert_allclose(float(short(1)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)


def test_train_only_temporal_regulariser_and_source_dropout(batch):
    """Both train-only extras (off by default): the regulariser is added to the objective and
    reported apart; source dropout zeroes a monthly source's features and masks for the batch."""
    from han_jax.config import RegularizationConfig

    reg = RegularizationConfig(temporal_reg=True, source_dropout=True, source_dropout_prob=1.0,
                               source_dropout_sources=("hdx_conflict",))
    cfg = CFG.replace(model=dataclasses.replace(MODEL, dropout=0.0),
                      step=dataclasses.replace(CFG.step, regularization=reg))
    inputs, targets = batch
    state = create_train_state(jax.random.PRNGKey(2), cfg, inputs)
    steps = jit_steps(cfg)
    _, m = steps.train(jax.tree_util.tree_map(jnp.copy, state), inputs, targets)
    assert float(m["temporal_reg"]) > 0
    np.testing.assert_allclose(float(m["objective"]), float(m["weighted_total"] + m["temporal_reg"]), rtol=1e-6)
    zeroed = lambda arrays: {**arrays, "hdx_conflict": np.zeros_like(arrays["hdx_conflict"])}
    dropped = inputs.replace(monthly_features=zeroed(inputs.monthly_features),
                             monthly_masks=zeroed(inputs.monthly_masks))
    # With model dropout 0, train sees exactly what eval sees on the dropped inputs ...
    np.testing.assert_allclose(float(m["weighted_total"]),
                               float(steps.eval(state, dropped, targets).metrics["weighted_total"]), rtol=1e-5)
    # ... and eval itself never drops a source.
    assert float(steps.eval(state, inputs, targets).metrics["weighted_total"]) != float(m["weighted_total"])


def test_optax_owns_the_schedule_in_both_units(state, batch):
    """Epoch unit: start_epoch writes the epoch's rate into the optimiser state (the original's
    per-epoch scheduler.step()) and drops a partial accumulation; step unit: optax evaluates the
    schedule at each update."""
    from han_jax.steps import current_learning_rate, learning_rate_schedule

    steps = jit_steps(CFG)
    sched = learning_rate_schedule(CFG.step.optim, num_epochs=CFG.train.epochs)
    s = steps.start_epoch(jax.tree_util.tree_map(jnp.copy, state), jnp.int32(2))
    np.testing.assert_allclose(float(current_learning_rate(s.opt_state)), float(sched(2)), rtol=1e-6)
    s, m = steps.train_deterministic(s, *batch)
    np.testing.assert_allclose(float(m["learning_rate"]), float(sched(2)), rtol=1e-6)

    step_cfg = CFG.replace(step=dataclasses.replace(
        CFG.step, optim=dataclasses.replace(CFG.step.optim, schedule_unit="step", accumulation_steps=2)))
    step_sched = learning_rate_schedule(step_cfg.step.optim, num_epochs=step_cfg.train.epochs)
    s = create_train_state(jax.random.PRNGKey(0), step_cfg, batch[0])
    rates = []
    for _ in range(4):
        s, m = jit_steps(step_cfg).train_deterministic(s, *batch)
        rates.append(float(m["learning_rate"]))
    # Updates land on micro-batches 2 and 4, at the schedule's values for updates 0 and 1.
    np.testing.assert_allclose(rates[1], float(step_sched(0)), rtol=1e-6)
    np.testing.assert_allclose(rates[3], float(step_sched(1)), rtol=1e-6)
    assert int(s.opt_state.inner_state.gradient_step) == 2
    half = jit_steps(step_cfg).train_deterministic(s, *batch)[0]
    assert int(half.opt_state.inner_state.mini_step) == 1
    reset = jit_steps(step_cfg).start_epoch(half, jnp.int32(1))
    assert int(reset.opt_state.inner_state.mini_step) == 0
    chex.assert_trees_all_equal(_host(reset.opt_state.inner_state.acc_grads),
                                jax.tree_util.tree_map(np.zeros_like, _host(half.opt_state.inner_state.acc_grads)))


def test_split_statistics_of_pieces_give_the_whole_batch_metrics(state, batch):
    """eval_step's statistics, merged over pieces of a batch, give that batch's own metrics, and one
    batch accumulated then finalised equals the step's metrics (one definition for both)."""
    from han_jax.metrics import SplitAccumulator, to_host_metrics

    steps = jit_steps(CFG)
    whole = steps.eval(state, *batch)
    one = SplitAccumulator()
    one.update(whole.statistics)
    expected = to_host_metrics(whole.metrics)
    inputs, targets = batch
    pieces = SplitAccumulator()
    for lo, hi in ((0, 3), (3, 4), (4, 8)):  # uneven pieces, the last holds the padding row
        mask = np.zeros(B, bool)
        mask[lo:hi] = True
        part = targets.replace(sample_mask=np.asarray(targets.sample_mask) & mask)
        pieces.update(steps.eval(state, inputs, part).statistics)
    for acc in (one, pieces):
        got = acc.result(state.log_vars, CFG)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if value is None:
                assert got[key] is None, key
            else:
                np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
