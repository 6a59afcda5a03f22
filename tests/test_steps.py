"""train/eval/test steps: one shared path, sharded jit == pmap == one device, guards, accumulation, the optimiser."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from han_jax.config import AggregateConfig, OptimConfig, RegularizationConfig, StepConfig, TrainConfig
from han_jax.objective import to_host_metrics
from han_jax.testing import compiled_kernels
from han_jax.training.accumulate import SplitAccumulator
from han_jax.training.devices import PmapDevices, SingleDevice, make_devices
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import (
    create_train_state,
    current_learning_rate,
    from_optimizer_view,
    make_optimizer,
    optimizer_view,
    with_flat_accumulator,
    with_tree_accumulator,
)
from tests.helpers import B, fresh

TRAIN_EXTRAS = {"objective", "temporal_reg", "learning_rate", "skipped_step", "grad_norm", "loss_scale"}


def _host(tree):
    return jax.device_get(tree)


def test_shared_path_gives_identical_metrics_in_every_phase(tiny):
    steps, state, batch, spec = tiny.steps, tiny.state, tiny.batch, tiny.spec
    _, train_out = steps.train_deterministic(fresh(state), *batch)
    eval_out, test_out = steps.eval(state, *batch), steps.test(state, *batch)
    train_m, eval_m, test_m, preds = train_out.metrics, eval_out.metrics, test_out.metrics, test_out.predictions
    assert eval_out.predictions == {} and train_out.predictions == {}  # one return shape: StepOutput
    chex.assert_trees_all_close(_host(eval_out.statistics), _host(test_out.statistics), rtol=0, atol=0)
    # Train's statistics are the same statistics (dropout off here): one pass, read by every phase.
    chex.assert_trees_all_close(_host(train_out.statistics), _host(eval_out.statistics), rtol=1e-6, atol=1e-6)
    # Same keys: train only adds what only training has.
    assert set(eval_m) == set(test_m)
    assert set(train_m) - set(eval_m) == TRAIN_EXTRAS
    chex.assert_trees_all_close(_host(eval_m), _host(test_m), rtol=0, atol=0)
    chex.assert_trees_all_close({k: train_m[k] for k in eval_m}, _host(eval_m), rtol=1e-6, atol=1e-7)
    for key in ("weighted_total", "simple_total", "data_term", "uncertainty_term", "reg_term", "n_rows",
                "regime_accuracy", "regime_balanced_accuracy", "casualty_mae", "anomaly_mse", "forecast_mse",
                "transition_positives", "high_obs/weighted_total", "low_obs/weighted_total"):
        assert key in eval_m, key
    weighted = spec.objective.weighted
    for task in weighted:
        assert f"loss/{task}" in eval_m and f"weight/{task}" in eval_m and f"contribution/{task}" in eval_m
    np.testing.assert_allclose(float(eval_m["data_term"] + eval_m["uncertainty_term"]),
                               sum(float(eval_m[f"contribution/{t}"]) for t in weighted), rtol=1e-5)
    assert float(eval_m["n_rows"]) == 7.0
    np.testing.assert_allclose(float(eval_m["weighted_total"]),
                               float(eval_m["data_term"] + eval_m["uncertainty_term"] + eval_m["reg_term"]), rtol=1e-6)
    # Row strata: alternate rows have monthly obs 0.9 / 0.3 in the helper batch; row 7 is padding.
    assert float(eval_m["high_obs/n_rows"]) == 4.0 and float(eval_m["low_obs/n_rows"]) == 3.0
    chex.assert_shape(preds["regime_probs"], (B, spec.model.n_regime_classes))
    np.testing.assert_allclose(np.asarray(preds["regime_probs"]).sum(-1), 1.0, rtol=1e-5)
    # The objective differentiated is the weighted total reported: one computation, two readings.
    assert float(train_m["objective"]) == pytest.approx(float(train_m["weighted_total"]), rel=1e-6)


def test_train_step_updates_and_dropout_changes_outputs(tiny):
    steps, state, batch = tiny.steps, tiny.state, tiny.batch
    new_state, out = steps.train_deterministic(fresh(state), *batch)
    m = out.metrics
    assert int(new_state.step) == int(state.step) + 1 and float(m["skipped_step"]) == 0.0
    delta = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, state.params)
    assert max(jax.tree_util.tree_leaves(delta)) > 0
    # log-variances move at 10x the model learning rate (the configured multiplier)
    assert any(float(new_state.log_vars[t]) != float(state.log_vars[t]) for t in state.log_vars)
    # Without deterministic=True, dropout is on: the same batch scores differently.
    _, dropped = steps.train(fresh(state), *batch)
    assert float(dropped.metrics["weighted_total"]) != float(m["weighted_total"])


def test_a_new_epoch_count_learning_rate_or_data_reuses_the_compiled_steps(tiny):
    """Only the specification is static: what changes the loop, the schedule or the data's dates compiles nothing."""
    config = tiny.config
    other = config.replace(
        train=dataclasses.replace(config.train, epochs=17, patience=2, tensorboard=False, seed=5),
        data=dataclasses.replace(config.data, end_date="2022-12-01", val_ratio=0.2, embargo_days=3),
        step=dataclasses.replace(config.step, optim=dataclasses.replace(config.step.optim, learning_rate=5e-4,
                                                                        warmup_epochs=3, min_lr=1e-7)))
    spec = StepSpec.of(other, tiny.resolved)
    assert spec == tiny.spec and hash(spec) == hash(tiny.spec)
    compiled = SingleDevice().compiled(spec)
    assert compiled is tiny.steps.compiled
    sizes = [f._cache_size() for f in (compiled.train, compiled.eval, compiled.start_epoch)]
    steps = SingleDevice().steps(spec, Schedule.of(other.step.optim, epochs=17))
    state = steps.start_epoch(fresh(tiny.state), 3)
    schedule = Schedule.of(other.step.optim, epochs=17)
    np.testing.assert_allclose(float(current_learning_rate(state.opt_state)), float(schedule(3)), rtol=1e-6)
    _, out = steps.train(state, *tiny.batch)
    steps.eval(tiny.state, *tiny.batch)
    np.testing.assert_allclose(float(out.metrics["learning_rate"]), float(schedule(3)), rtol=1e-6)
    assert [f._cache_size() for f in (compiled.train, compiled.eval, compiled.start_epoch)] == sizes
    # What does change the program is part of the specification.
    for changed in (dataclasses.replace(config.model, d_model=8),
                    dataclasses.replace(config.step, optim=dataclasses.replace(config.step.optim, weight_decay=0.5))):
        section = "model" if changed.__class__.__name__ == "ModelConfig" else "step"
        assert StepSpec.of(config.replace(**{section: changed}), tiny.resolved) != tiny.spec


@pytest.mark.slow
def test_multi_device_layouts_equal_one_device(tiny):
    """Sharded jit (the default) and pmap over 4 devices give one device's numbers: the global view of
    sharded jit draws one device's dropout bits, so even a step with dropout on matches."""
    spec, state, batch, schedule = tiny.spec, tiny.state, tiny.batch, tiny.schedule
    one_state, one = tiny.steps.train(fresh(state), *batch)
    sharded = make_devices(4, "sharded")
    assert sharded.kind == "sharded" and sharded.num_devices == 4
    on_rows = sharded.put_batch(batch)
    assert on_rows[0].month_boundaries.sharding.spec == sharded.rows.spec
    assert len(on_rows[1].sample_mask.addressable_shards) == 4  # each device holds 2 of the 8 rows
    s_state, s_out = sharded.steps(spec, schedule).train(sharded.put_state(state), *on_rows)
    assert s_out.metrics["weighted_total"].sharding.is_fully_replicated
    chex.assert_trees_all_close(_host(s_out.metrics), _host(one.metrics), rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(_host(s_out.statistics), _host(one.statistics), rtol=2e-5, atol=1e-5)
    # Zero-true-gradient attention key biases move by Adam-amplified float noise: a looser absolute tolerance.
    chex.assert_trees_all_close(_host(s_state.params), _host(one_state.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(s_state.log_vars), _host(one_state.log_vars), rtol=1e-6, atol=1e-7)

    # pmap: the same bodies with axis_name (eval here; the train step with pmap is the slow tier's).
    pmap = PmapDevices(4)
    p_eval = pmap.steps(spec, schedule).eval(pmap.put_state(state), *pmap.put_batch(batch))
    one_eval = tiny.steps.eval(state, *batch)
    chex.assert_trees_all_close(_host(pmap.first(p_eval.metrics)), _host(one_eval.metrics), rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(_host(pmap.first(p_eval.statistics)), _host(one_eval.statistics), rtol=2e-5,
                                atol=1e-5)


@pytest.mark.slow
def test_pmap_train_step_equals_one_device(tiny):
    spec, state, batch = tiny.spec, tiny.state, tiny.batch
    single_state, single = tiny.steps.train_deterministic(fresh(state), *batch)
    pmap = PmapDevices(4)
    p_state, p_out = pmap.steps(spec, tiny.schedule).train_deterministic(pmap.put_state(state),
                                                                        *pmap.put_batch(batch))
    chex.assert_trees_all_close(_host(pmap.first(p_out.metrics)), _host(single.metrics), rtol=2e-5, atol=1e-6)
    # grad_norm (in the metrics above, compared tightly) is the norm of the averaged gradients: it pins the pmean.
    chex.assert_trees_all_close(_host(pmap.first(p_state.params)), _host(single_state.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(pmap.first(p_state.log_vars)), _host(single_state.log_vars), rtol=1e-6,
                                atol=1e-7)


def test_nan_in_one_task_is_excluded_and_params_stay_finite(tiny):
    state, (inputs, targets) = tiny.state, tiny.batch
    ft = np.array(targets.forecast_targets)
    mask = np.array(targets.forecast_masks)
    ft[0, -1, 0], mask[0, -1, 0] = np.nan, True
    bad = targets.replace(forecast_targets=ft, forecast_masks=mask)
    new_state, out = tiny.steps.train_deterministic(fresh(state), inputs, bad)
    m = out.metrics
    assert np.isnan(float(m["loss/forecast"])) and float(m["included/forecast"]) == 0.0
    assert float(m["skipped_step"]) == 0.0 and np.isfinite(float(m["weighted_total"]))
    for leaf in jax.tree_util.tree_leaves(new_state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
    assert any(jax.tree_util.tree_leaves(changed))  # the other tasks still trained


def test_non_finite_gradients_skip_the_update(tiny):
    poisoned = fresh(tiny.state)
    leaves, treedef = jax.tree_util.tree_flatten(poisoned.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.inf)
    poisoned = poisoned.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))
    before = _host(poisoned)
    new_state, out = tiny.steps.train_deterministic(fresh(poisoned), *tiny.batch)
    assert float(out.metrics["skipped_step"]) == 1.0
    chex.assert_trees_all_equal(_host(new_state.params), before.params)
    # optax.apply_if_finite: the moments and the accumulation inside are untouched; it counts the skip.
    chex.assert_trees_all_equal(_host(new_state.opt_state.inner_state), before.opt_state.inner_state)
    assert int(new_state.opt_state.total_notfinite) == int(before.opt_state.total_notfinite) + 1
    chex.assert_trees_all_equal(_host(new_state.log_vars), before.log_vars)
    assert int(new_state.step) == int(before.step) + 1


@pytest.mark.slow
def test_accumulating_four_micro_batches_equals_one_step_on_the_whole_batch(tiny):
    """Holds for losses that are plain means over rows; batch statistics (regime class
    weights, variance penalties, loss floors) make micro-batch and whole-batch losses
    differ, so this aggregates the per-row-mean tasks only, with every row valid."""
    per_row_mean = ("transition", "casualty", "daily_forecast")
    inputs, targets = tiny.batch
    targets = targets.replace(sample_mask=np.ones(B, bool), phase_valid=np.ones(B, bool),
                              casualty_valid=np.ones(B, bool))

    def steps_and_state(accumulation_steps):
        step = StepConfig(aggregate=AggregateConfig(task_names=per_row_mean),
                          optim=OptimConfig(accumulation_steps=accumulation_steps, warmup_epochs=0))
        config = tiny.config.replace(step=step, train=TrainConfig(epochs=5))
        spec = StepSpec.of(config, tiny.resolved)
        steps = SingleDevice().steps(spec, Schedule.of(config.step.optim, epochs=5))
        return steps, steps.start_epoch(create_train_state(jax.random.PRNGKey(1), spec, inputs), 0)

    (one, s1), (four, s4) = steps_and_state(1), steps_and_state(4)
    s1, _ = one.train_deterministic(s1, inputs, targets)
    for i in range(4):
        part = jax.tree_util.tree_map(lambda x, i=i: x[2 * i:2 * i + 2], (inputs, targets))
        before = _host(s4.params)
        s4, _ = four.train_deterministic(s4, *part)
        if i < 3:
            chex.assert_trees_all_equal(_host(s4.params), before)  # nothing applied mid-accumulation
    # Same tolerance as the multi-device tests: zero-true-gradient key biases move by Adam-amplified noise.
    chex.assert_trees_all_close(_host(s4.params), _host(s1.params), rtol=1e-4, atol=2e-5)
    chex.assert_trees_all_close(_host(s4.log_vars), _host(s1.log_vars), rtol=1e-6, atol=1e-7)


def test_the_trees_are_rebuilt_from_the_flat_vectors_with_one_kernel_per_leaf_shape():
    """from_optimizer_view slices at run-time offsets: its values are ravel_pytree's, and leaves of one
    shape share a compiled kernel (static offsets give one kernel per leaf)."""
    rng = np.random.default_rng(0)
    like = {"model": {f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                                     "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)} for i in range(6)},
            "log_vars": {"a": jnp.float32(0.5), "b": jnp.float32(-0.25)}}
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


@pytest.mark.slow
def test_the_optimiser_on_flat_group_vectors_is_the_same_update_as_on_the_trees(tiny):
    """train_step hands optax one vector per group (optimizer_view); optax on the parameter trees is the reference.

    Five micro-batches of random gradients (one accumulated update of four, one more accumulating), a
    weight decay that reads the parameters, and the gradient clip (gradients far above max_grad_norm).
    """
    import optax

    state = tiny.state
    spec = StepSpec.of(tiny.config.replace(step=dataclasses.replace(
        tiny.config.step, optim=OptimConfig(accumulation_steps=4))), tiny.resolved)
    tx = make_optimizer(spec, learning_rate=1e-3)
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


@pytest.mark.slow
def test_train_only_temporal_regulariser_and_source_dropout(tiny):
    """Both train-only extras (off by default): the regulariser is added to the objective and
    reported apart; source dropout zeroes a monthly source's features and masks for the batch."""
    reg = RegularizationConfig(temporal_reg=True, source_dropout=True, source_dropout_prob=1.0,
                               source_dropout_sources=("hdx_conflict",))
    config = tiny.config.replace(model=dataclasses.replace(tiny.config.model, dropout=0.0),
                                 step=dataclasses.replace(tiny.config.step, regularization=reg))
    spec = StepSpec.of(config, tiny.resolved)
    inputs, targets = tiny.batch
    steps = SingleDevice().steps(spec, tiny.schedule)
    state = steps.start_epoch(create_train_state(jax.random.PRNGKey(2), spec, inputs), 0)
    _, out = steps.train(fresh(state), inputs, targets)
    m = out.metrics
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


def test_the_epoch_schedule_is_written_by_start_epoch(tiny):
    """Epoch unit: start_epoch writes the epoch's rate (the original's per-epoch scheduler.step()) into the
    optimiser state and drops a partial accumulation; the train step reports the rate it used."""
    schedule = tiny.schedule
    s = tiny.steps.start_epoch(fresh(tiny.state), 2)
    np.testing.assert_allclose(float(current_learning_rate(s.opt_state)), float(schedule(2)), rtol=1e-6)
    _, out = tiny.steps.train_deterministic(s, *tiny.batch)
    np.testing.assert_allclose(float(out.metrics["learning_rate"]), float(schedule(2)), rtol=1e-6)


@pytest.mark.slow
def test_the_step_schedule_is_evaluated_at_each_update(tiny):
    config = tiny.config.replace(step=dataclasses.replace(tiny.config.step, optim=dataclasses.replace(
        tiny.config.step.optim, schedule_unit="step", accumulation_steps=2)))
    spec = StepSpec.of(config, tiny.resolved)
    schedule = Schedule.of(config.step.optim, epochs=config.train.epochs, steps_per_epoch=4)
    steps = SingleDevice().steps(spec, schedule)
    s = steps.start_epoch(create_train_state(jax.random.PRNGKey(0), spec, tiny.batch[0]), 0)
    rates = []
    for _ in range(4):
        s, out = steps.train_deterministic(s, *tiny.batch)
        rates.append(float(out.metrics["learning_rate"]))
    # Updates land on micro-batches 2 and 4, at the schedule's values for updates 0 and 1.
    np.testing.assert_allclose(rates[1], float(schedule(0)), rtol=1e-6)
    np.testing.assert_allclose(rates[3], float(schedule(1)), rtol=1e-6)
    assert int(s.opt_state.inner_state.gradient_step) == 2
    half = steps.train_deterministic(s, *tiny.batch)[0]
    assert int(half.opt_state.inner_state.mini_step) == 1
    reset = steps.start_epoch(half, 1)
    assert int(reset.opt_state.inner_state.mini_step) == 0
    chex.assert_trees_all_equal(_host(reset.opt_state.inner_state.acc_grads),
                                jax.tree_util.tree_map(np.zeros_like, _host(half.opt_state.inner_state.acc_grads)))


def test_split_statistics_of_pieces_give_the_whole_batch_metrics(tiny):
    """eval_step's statistics, merged over pieces of a batch, give that batch's own metrics, and one
    batch accumulated then finalised equals the step's metrics (one definition for both)."""
    steps, state, spec = tiny.steps, tiny.state, tiny.spec
    whole = steps.eval(state, *tiny.batch)
    one = SplitAccumulator()
    one.update(whole.statistics)
    expected = to_host_metrics(whole.metrics, spec.objective.tasks)
    inputs, targets = tiny.batch
    pieces = SplitAccumulator()
    for lo, hi in ((0, 3), (3, 4), (4, 8)):  # uneven pieces, the last holds the padding row
        mask = np.zeros(B, bool)
        mask[lo:hi] = True
        part = targets.replace(sample_mask=np.asarray(targets.sample_mask) & mask)
        pieces.update(steps.eval(state, inputs, part).statistics)
    for acc in (one, pieces):
        got = acc.result(state.log_vars, spec.objective)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if value is None:
                assert got[key] is None, key
            else:
                np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
