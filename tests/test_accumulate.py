"""From steps to a phase's numbers: exact metrics of merged statistics; the train phase's per-batch loss means."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from han_jax import tasks
from han_jax.config import ModelConfig
from han_jax.objective import Objective, forward_statistics, metrics_from_statistics
from han_jax.training.accumulate import EpochAccumulator, SplitAccumulator
from tests.test_losses import make_outputs, make_targets, to_targets

OBJECTIVE = Objective(tasks=tasks.tasks(), model=ModelConfig(n_regime_classes=4, monthly_sources=(("a", 6),)))


@jax.jit
def _batch(outputs, targets, log_vars):
    _, stats = forward_statistics(outputs, targets, tasks=OBJECTIVE.tasks, loss=OBJECTIVE.loss)
    return metrics_from_statistics(stats, log_vars, OBJECTIVE), stats


def _batches(n_real=(8, 2)):
    rng = np.random.default_rng(0)
    log_vars = OBJECTIVE.init_log_vars()
    out = []
    for n in n_real:  # the last, partial batch holds 2 real rows of 8
        outputs = {k: jnp.asarray(v) for k, v in make_outputs(rng).items()}
        targets = make_targets(rng, n_real=n)
        targets["monthly_obs_rate"] = np.where(np.arange(8) % 2 == 0, 0.9, 0.3).astype(np.float32)
        out.append((outputs, to_targets(targets), _batch(outputs, to_targets(targets), log_vars)))
    return out, log_vars


def test_the_train_phase_weighs_losses_by_real_rows_and_reads_the_rest_exactly():
    batches, log_vars = _batches()
    epoch, split = EpochAccumulator(), SplitAccumulator()
    for _, _, (metrics, stats) in batches:
        epoch.update({**metrics, "learning_rate": jnp.float32(1e-3), "skipped_step": jnp.float32(1.0),
                      "objective": metrics["weighted_total"]}, stats)
        split.update(stats)
    got, exact = epoch.result(log_vars, OBJECTIVE), split.result(log_vars, OBJECTIVE)
    (m1, _), (m2, _) = batches[0][2], batches[1][2]
    rows = np.array([float(m1["n_rows"]), float(m2["n_rows"])])
    assert rows.tolist() == [8.0, 2.0]
    for key in ("weighted_total", "simple_total", "loss/regime", "weight/casualty", "objective"):
        want = (float(m1[key if key != "objective" else "weighted_total"]) * 8
                + float(m2[key if key != "objective" else "weighted_total"]) * 2) / 10  # not the plain mean
        np.testing.assert_allclose(got[key], want, rtol=1e-6, err_msg=key)
    # A stratum's total is weighed by that stratum's rows.
    high = np.array([float(m1["high_obs/n_rows"]), float(m2["high_obs/n_rows"])])
    want = (float(m1["high_obs/weighted_total"]) * high[0]
            + float(m2["high_obs/weighted_total"]) * high[1]) / high.sum()
    np.testing.assert_allclose(got["high_obs/weighted_total"], want, rtol=1e-6)
    # Everything else is the exact metric of the epoch's statistics: counts add, ratios of sums.
    for key in ("n_rows", "n/regime", "regime_accuracy", "regime_balanced_accuracy", "casualty_mae",
                "forecast_next_mse", "targets/forecast", "regime_class_count"):
        np.testing.assert_allclose(got[key], exact[key], rtol=1e-6, err_msg=key)
    assert got["n_rows"] == 10.0
    correct = sum(np.asarray(m["regime_class_correct"]) for m, _ in (batches[0][2], batches[1][2]))
    count = sum(np.asarray(m["regime_class_count"]) for m, _ in (batches[0][2], batches[1][2]))
    np.testing.assert_allclose(got["regime_accuracy"], correct.sum() / count.sum(), rtol=1e-6)
    assert got["learning_rate"] == np.float32(1e-3) and got["skipped_step"] == 2.0


def test_a_mean_without_any_valid_row_is_none():
    batches, log_vars = _batches(n_real=(0,))
    acc = SplitAccumulator()
    acc.update(batches[0][2][1])
    out = acc.result(log_vars, OBJECTIVE)
    assert out["n_rows"] == 0.0
    for key in ("regime_accuracy", "casualty_mae", "anomaly_mse", "forecast_next_mse", "weighted_total",
                "high_obs/weighted_total"):
        assert out[key] is None, key


def test_device_axis_takes_one_copy():
    batches, log_vars = _batches(n_real=(8,))
    metrics, stats = batches[0][2]
    stacked = lambda tree: jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), tree)
    one, four = EpochAccumulator(), EpochAccumulator()
    one.update(metrics, stats)
    four.update(stacked(metrics), stacked(stats), device_axis=True)
    assert one.result(log_vars, OBJECTIVE) == four.result(log_vars, OBJECTIVE)


def test_sharded_jit_over_four_devices_gives_one_device_s_statistics_and_metrics():
    """The default multi-device layout: the objective sees the global batch, XLA adds the cross-device sums."""
    from han_jax.training.devices import make_devices

    batches, log_vars = _batches(n_real=(7,))
    outputs, targets, (metrics, stats) = batches[0]
    devices = make_devices(4, "sharded")
    sharded_outputs = jax.device_put(outputs, devices.rows)
    sharded_targets = devices.put_batch(targets)
    assert len(sharded_targets.sample_mask.addressable_shards) == 4
    got_metrics, got_stats = _batch(sharded_outputs, sharded_targets, log_vars)
    chex.assert_trees_all_close(jax.device_get(got_stats), jax.device_get(stats), rtol=2e-6, atol=1e-5)
    chex.assert_trees_all_close(jax.device_get(got_metrics), jax.device_get(metrics), rtol=2e-6, atol=1e-6)
