"""aggregate: Kendall's closed form, exclusion rules with finite gradients, strategies, jit/pmap."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax import tasks
from han_jax.config import AggregateConfig
from han_jax.core.aggregate import aggregate
from han_jax.core.aggregate import init_log_vars as _init_log_vars
from tests.reference_losses import reference_aggregate

TASK_NAMES = tasks.names()
# The original's probe-based initial log-variances (MultiTaskLoss.DEFAULT_TASK_PRIORS).
ORIGINAL_PRIORS = {"casualty": 1.4, "regime": 1.05, "transition": 1.4, "anomaly": 1.4, "forecast": 1.9,
                   "daily_forecast": 1.4}


def init_log_vars(priors=None):
    return _init_log_vars({t.name: t.prior for t in tasks.tasks()}, priors)


def _losses(**overrides):
    base = {"regime": 1.3, "transition": 0.7, "casualty": 4.2, "anomaly": 0.9, "forecast": 0.25, "daily_forecast": 0.05}
    base.update(overrides)
    return {k: jnp.float32(v) for k, v in base.items()}


def test_priors_are_the_originals():
    lv = init_log_vars()
    assert {k: round(float(v), 6) for k, v in lv.items()} == ORIGINAL_PRIORS
    assert float(init_log_vars(priors=0.5)["forecast"]) == 0.5
    assert float(init_log_vars(priors={"regime": 0.3})["casualty"]) == 0.0
    with pytest.raises(ValueError, match="unknown tasks"):
        init_log_vars(priors={"regim": 0.3})


def test_closed_form_by_hand():
    losses = {"regime": jnp.float32(2.0), "casualty": jnp.float32(3.0)}
    log_vars = {t: jnp.float32(0.0) for t in TASK_NAMES}
    log_vars["regime"] = jnp.float32(1.0)
    log_vars["casualty"] = jnp.float32(2.5)  # clipped to 2 in the weight, not in the regulariser
    total, info = aggregate(losses, log_vars)
    expected = (0.5 * math.exp(-1) * 2 + 0.5) + (0.5 * math.exp(-2) * 3 + 1.0) + 0.01 * (1.0 + 2.5**2)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    np.testing.assert_allclose(float(info.simple_total), 2.5, rtol=1e-6)
    np.testing.assert_allclose(float(info.weight["casualty"]), math.exp(-2), rtol=1e-6)
    np.testing.assert_allclose(float(info.data_term + info.uncertainty_term + info.reg_term), float(total), rtol=1e-6)
    assert set(info.included) == {"regime", "casualty"}


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    losses = {t: jnp.float32(v) for t, v in zip(TASK_NAMES, rng.gamma(1.0, 3.0, size=6))}
    log_vars = {t: jnp.float32(v) for t, v in zip(TASK_NAMES, rng.normal(0, 2, size=6))}
    total, info = jax.jit(aggregate)(losses, log_vars)
    np.testing.assert_allclose(float(total), reference_aggregate(losses, log_vars, TASK_NAMES), rtol=1e-5)
    np.testing.assert_allclose(float(info.weighted_total), float(total))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0])
def test_excluded_tasks_contribute_nothing_and_keep_gradients_finite(bad):
    log_vars = init_log_vars()
    losses = _losses(casualty=bad)
    total, info = aggregate(losses, log_vars)
    ref_losses = {k: v for k, v in _losses().items() if k != "casualty"}
    want, _ = aggregate(ref_losses, log_vars)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    assert not bool(info.included["casualty"])
    assert float(info.contribution["casualty"]) == 0.0
    np.testing.assert_allclose(float(info.simple_total), np.mean([float(v) for v in ref_losses.values()]), rtol=1e-6)
    g_loss, g_lv = jax.grad(lambda ls, v: aggregate(ls, v)[0], argnums=(0, 1))(losses, log_vars)
    for tree in (g_loss, g_lv):
        for k, g in tree.items():
            assert np.isfinite(float(g)), k
    assert float(g_loss["casualty"]) == 0.0
    assert float(g_lv["casualty"]) == 0.0  # neither its weight nor its regulariser counts


def test_huge_loss_is_capped_at_1e6():
    log_vars = init_log_vars()
    total, info = aggregate(_losses(casualty=5e7), log_vars)
    capped, _ = aggregate(_losses(casualty=1e6), log_vars)
    np.testing.assert_allclose(float(total), float(capped), rtol=1e-6)
    g = jax.grad(lambda ls: aggregate(ls, log_vars)[0])(_losses(casualty=5e7))
    assert float(g["casualty"]) == 0.0
    assert bool(info.included["casualty"])


def test_nothing_included_falls_back_to_log_var_regulariser():
    log_vars = init_log_vars()
    losses = {t: jnp.float32(np.nan) for t in TASK_NAMES}
    total, info = aggregate(losses, log_vars)
    expected = 1e-6 * sum(v**2 for v in ORIGINAL_PRIORS.values())
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(info.simple_total) == 0.0
    g = jax.grad(lambda v: aggregate(losses, v)[0])(log_vars)
    np.testing.assert_allclose(float(g["forecast"]), 2e-6 * 1.9, rtol=1e-5)


def test_log_var_clip_passes_gradient_at_the_boundary_like_torch_clamp():
    losses = _losses()
    log_vars = {**init_log_vars(), "regime": jnp.float32(2.0)}
    g = jax.grad(lambda v: aggregate(losses, v)[0])(log_vars)
    # d/dlv [0.5 e^-lv L + 0.5 lv] + 0.02 lv at lv = 2 (inside torch's inclusive range).
    np.testing.assert_allclose(float(g["regime"]), -0.5 * math.exp(-2) * 1.3 + 0.5 + 0.04, rtol=1e-5)


def test_equal_strategy_is_the_plain_mean_through_the_same_call():
    losses = _losses(anomaly=np.nan)
    total, info = aggregate(losses, init_log_vars(), AggregateConfig(strategy="equal"))
    vals = [float(v) for k, v in losses.items() if k != "anomaly"]
    np.testing.assert_allclose(float(total), np.mean(vals), rtol=1e-6)
    np.testing.assert_allclose(float(info.simple_total), np.mean(vals), rtol=1e-6)
    with pytest.raises(ValueError, match="strategy"):
        aggregate(losses, init_log_vars(), AggregateConfig(strategy="mean"))


def test_missing_log_var_is_an_error_naming_the_task():
    lv = init_log_vars()
    del lv["forecast"]
    with pytest.raises(ValueError, match="forecast"):
        aggregate(_losses(), lv)


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_variants_agree(self):
        losses, log_vars = _losses(transition=np.nan), init_log_vars()
        want = aggregate(losses, log_vars)
        got = self.variant(aggregate)(losses, log_vars)
        chex.assert_trees_all_close(got, want, rtol=1e-6)


# --- properties over arbitrary inputs (hypothesis) -------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_loss_values = st.one_of(
    st.floats(min_value=2.0**-20, max_value=2.0**27, allow_nan=False, width=32),
    st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e6, 5e6]),
)
_log_vars = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(losses=st.lists(_loss_values, min_size=6, max_size=6), lvs=st.lists(_log_vars, min_size=6, max_size=6))
def test_property_matches_reference_and_gradients_stay_finite(losses, lvs):
    loss_tree = {t: jnp.float32(v) for t, v in zip(TASK_NAMES, losses)}
    lv_tree = {t: jnp.float32(v) for t, v in zip(TASK_NAMES, lvs)}
    total, info = aggregate(loss_tree, lv_tree)
    np.testing.assert_allclose(float(total), reference_aggregate(loss_tree, lv_tree, TASK_NAMES), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(info.data_term + info.uncertainty_term + info.reg_term), float(total),
                               rtol=1e-5, atol=1e-6)
    for t in TASK_NAMES:
        ok = np.isfinite(float(loss_tree[t])) and float(loss_tree[t]) != 0
        assert bool(info.included[t]) == ok
    g_loss, g_lv = jax.grad(lambda ls, v: aggregate(ls, v)[0], argnums=(0, 1))(loss_tree, lv_tree)
    assert all(np.isfinite(float(g)) for g in jax.tree_util.tree_leaves((g_loss, g_lv)))
