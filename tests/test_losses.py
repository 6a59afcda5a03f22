"""compute_losses: hand-computed cases, the numpy reference, padding, fallbacks, jit/pmap."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax import tasks
from han_jax.config import LossConfig
from han_jax.core.aggregate import aggregate, init_log_vars
from han_jax.core.batch import Targets
from han_jax.objective import compute_losses, compute_losses_with_diagnostics, temporal_regularization
from han_jax.tasks.casualty import zinb_nll
from han_jax.tasks.regime import weighted_smoothed_cross_entropy
from tests import reference_losses as ref

TASKS = ("regime", "transition", "casualty", "anomaly", "forecast", "daily_forecast")


def make_outputs(rng, b=8, m=3, k=4, ff=6, h=4, d=5, scale=1.0):
    return {
        "regime_logits": (scale * rng.normal(size=(b, m, k))).astype(np.float32),
        "anomaly_score": (scale * rng.normal(size=(b, m, 1))).astype(np.float32),
        "casualty_pred": (scale * rng.normal(size=(b, m, 3))).astype(np.float32),
        "casualty_var": np.exp(rng.normal(size=(b, m, 3))).astype(np.float32),
        "forecast_pred": (scale * rng.normal(size=(b, m, ff))).astype(np.float32),
        "daily_forecast_pred": (scale * rng.normal(size=(b, h, d))).astype(np.float32),
    }


def make_targets(rng, b=8, m=3, ft=9, p_valid=0.7, n_real=None, none=()):
    n_real = b if n_real is None else n_real
    t = {
        "phase_index": rng.integers(0, 11, size=b).astype(np.int32),
        "phase_valid": rng.random(b) < p_valid,
        "is_transition": rng.random(b) < 0.3,
        # Zero fatalities exercise the zero-inflation branch.
        "fatalities": np.where(rng.random(b) < 0.2, 0.0, rng.gamma(2.0, 2000.0, size=b)).astype(np.float32),
        "casualty_valid": rng.random(b) < p_valid,
        "anomaly": rng.normal(size=b).astype(np.float32),
        "anomaly_valid": rng.random(b) < p_valid,
        "forecast_targets": rng.normal(size=(b, m, ft)).astype(np.float32),
        "forecast_masks": rng.random((b, m, ft)) < p_valid,
        "sample_mask": np.arange(b) < n_real,
    }
    for name in none:
        t[name] = None
        partner = {"phase_index": "phase_valid", "fatalities": "casualty_valid", "anomaly": "anomaly_valid",
                   "forecast_targets": "forecast_masks"}.get(name)
        if partner:
            t[partner] = None
    return t


def to_targets(t):
    return Targets(**{k: (None if v is None else jnp.asarray(v)) for k, v in t.items()})


def assert_matches_reference(outputs, t, rtol=2e-5, atol=1e-6, config=LossConfig()):
    got = jax.jit(compute_losses, static_argnums=2)(outputs, to_targets(t), config)
    want = ref.reference_losses(outputs, t, daily_forecast_latent=config.daily_forecast_latent)
    assert set(got) == set(want) == set(TASKS)
    for task in TASKS:
        np.testing.assert_allclose(float(got[task]), want[task], rtol=rtol, atol=atol, err_msg=task)
        assert got[task].dtype == jnp.float32


# --- hand-computed pieces -------------------------------------------------


def test_weighted_label_smoothing_matches_pytorch_formula_by_hand():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], np.float32)
    labels = np.array([0, 2])
    w = np.array([0.5, 1.0, 2.5], np.float32)
    e = 0.1

    def nlp(row):
        z = sum(math.exp(v) for v in row)
        return [-(v - math.log(z)) for v in row]

    rows = [nlp(r) for r in logits.tolist()]
    num = sum((1 - e) * w[y] * r[y] + e / 3 * sum(wc * rc for wc, rc in zip(w, r)) for r, y in zip(rows, labels))
    expected = num / (w[0] + w[2])  # normalised by the target classes' weights only
    n, wy = weighted_smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w), e)
    np.testing.assert_allclose(float(n.sum() / wy.sum()), expected, rtol=1e-6)
    # Not the same as normalising by the mean weight: the formula is what is pinned.
    assert abs(float(n.sum() / 2) - expected) > 1e-3


def test_zinb_nll_by_hand():
    pi, mu, theta = 0.2, 1.5, 2.0
    p0 = pi + (1 - pi) * (theta / (theta + mu)) ** theta
    log_nb2 = (math.lgamma(2 + theta) - math.lgamma(theta) - math.lgamma(3)
               + theta * math.log(theta / (theta + mu)) + 2 * math.log(mu / (theta + mu)))
    got = zinb_nll(jnp.array([0.0, 2.0]), jnp.full(2, pi), jnp.full(2, mu), jnp.full(2, theta))
    np.testing.assert_allclose(np.asarray(got), [-math.log(p0), -(math.log(1 - pi) + log_nb2)], rtol=1e-5)
    # Per-row NLL is clamped to [0, 20] and NaN becomes 20.
    big = zinb_nll(jnp.array([5e4]), jnp.array([0.5]), jnp.array([1e-3]), jnp.array([0.1]))
    assert float(big[0]) == 20.0
    nan = zinb_nll(jnp.array([jnp.nan]), jnp.array([0.5]), jnp.array([1.0]), jnp.array([1.0]))
    assert float(nan[0]) == 20.0


def test_regime_hand_case_with_penalties():
    # Two valid rows of coarse classes 3 and 0, uniform logits -> CE = log K exactly,
    # entropies are maximal so both penalties vanish.
    b, m, k = 2, 1, 4
    outputs = make_outputs(np.random.default_rng(0), b=b, m=m, k=k)
    outputs["regime_logits"] = np.zeros((b, m, k), np.float32)
    t = make_targets(np.random.default_rng(0), b=b, m=m)
    t["phase_index"] = np.array([10, 0], np.int32)
    t["phase_valid"] = np.array([True, True])
    got = compute_losses(outputs, to_targets(t))["regime"]
    np.testing.assert_allclose(float(got), math.log(4), rtol=1e-6)
    # Confident, identical predictions: CE small but the floor and both penalties apply.
    outputs["regime_logits"] = np.tile(np.array([50.0, -50, -50, -50], np.float32), (b, m, 1))
    t["phase_index"] = np.array([0, 1], np.int32)  # both coarse class 0
    got = float(compute_losses(outputs, to_targets(t))["regime"])
    # Batch class weights: counts [2, 1, 1, 1] -> 1/counts normalised to sum K: [4/7, 8/7, 8/7, 8/7].
    w = np.array([0.5, 1, 1, 1]) / 3.5 * 4
    # Only the smoothing mass on the three -50 logits costs (-log p = 100 each); divide by w[y].
    ce_floor = max((0.1 / 4) * 3 * w[1] * 100 / w[0], 0.05)
    expected = ce_floor + 0.3 * 0.5 * math.log(4) + 0.3 * 0.7 * math.log(4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_anomaly_single_valid_row_has_no_variance_penalty():
    rng = np.random.default_rng(1)
    outputs = make_outputs(rng)
    t = make_targets(rng)
    t["anomaly_valid"] = np.zeros(8, bool)
    t["anomaly_valid"][3] = True
    got = float(compute_losses(outputs, to_targets(t))["anomaly"])
    s = float(np.clip(outputs["anomaly_score"][3, -1, 0], -10, 10))
    np.testing.assert_allclose(got, (s - t["anomaly"][3]) ** 2, rtol=1e-5)


def test_all_invalid_rows_use_tiny_regularisers():
    rng = np.random.default_rng(2)
    outputs = make_outputs(rng)
    t = make_targets(rng, p_valid=0.0)
    got = compute_losses(outputs, to_targets(t))
    last = outputs["regime_logits"][:, -1]
    np.testing.assert_allclose(float(got["regime"]), 1e-6 * np.mean(last**2), rtol=1e-5)
    s = outputs["anomaly_score"][:, -1, 0]
    np.testing.assert_allclose(float(got["transition"]), 1e-6 * np.mean(s**2), rtol=1e-5)
    np.testing.assert_allclose(float(got["anomaly"]), 1e-6 * np.mean(s**2), rtol=1e-5)
    np.testing.assert_allclose(float(got["forecast"]), 1e-6 * np.mean(outputs["forecast_pred"] ** 2), rtol=1e-5)
    cp, cv = outputs["casualty_pred"][:, -1], outputs["casualty_var"][:, -1]
    expected = 0.01 * (np.mean((ref.sigmoid(cp[:, 0]) - 0.5) ** 2) + 0.01 * np.mean(cp[:, 1] ** 2)
                       + np.mean((ref.softplus(cv[:, 0]) - 1) ** 2))
    np.testing.assert_allclose(float(got["casualty"]), expected, rtol=1e-5)


# --- against the numpy reference ------------------------------------------

SCENARIOS = {
    "all_valid": dict(p_valid=1.0),
    "mixed": dict(p_valid=0.6),
    "mostly_invalid": dict(p_valid=0.15),
    "none_valid": dict(p_valid=0.0),
    "padding_rows": dict(p_valid=0.7, n_real=5),
    "no_regime_targets": dict(none=("phase_index", "is_transition")),
    "no_casualty_targets": dict(none=("fatalities",)),
    "no_anomaly_targets": dict(none=("anomaly",)),
    "no_forecast_targets": dict(none=("forecast_targets",)),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("seed", range(2))
def test_matches_reference(scenario, seed):
    rng = np.random.default_rng(100 + seed)
    kw = dict(SCENARIOS[scenario])
    outputs = make_outputs(rng, scale=1.0 + seed)
    assert_matches_reference(outputs, make_targets(rng, **kw))


@pytest.mark.parametrize("m", [1, 2])
def test_short_sequences_match_reference(m):
    rng = np.random.default_rng(7)
    outputs = make_outputs(rng, m=m, h=1)
    assert_matches_reference(outputs, make_targets(rng, m=m))
    assert_matches_reference(outputs, make_targets(rng, m=m, none=("phase_index", "is_transition", "forecast_targets")))


def test_eleven_class_head_uses_phases_directly():
    rng = np.random.default_rng(8)
    assert_matches_reference(make_outputs(rng, k=11), make_targets(rng))


def test_feature_mode_daily_forecast_and_focal_option():
    rng = np.random.default_rng(9)
    outputs = make_outputs(rng, h=4, d=5)
    t = make_targets(rng)
    daily = np.where(rng.random((8, 4, 5)) < 0.2, -999.0, rng.normal(size=(8, 4, 5)))
    t["daily_forecast_targets"] = daily.astype(np.float32)
    t["daily_forecast_masks"] = rng.random((8, 4, 5)) < 0.8
    assert_matches_reference(outputs, t, config=LossConfig(daily_forecast_latent=False))
    focal = compute_losses(outputs, to_targets(t), LossConfig(transition_focal=True))["transition"]
    plain = compute_losses(outputs, to_targets(t))["transition"]
    assert float(focal) < float(plain)  # focal down-weights every row (alpha <= 0.75, (1-p_t)^2 < 1)


def test_padding_rows_are_as_if_absent_even_with_garbage():
    rng = np.random.default_rng(10)
    outputs = make_outputs(rng, b=5)
    t = make_targets(rng, b=5)
    losses = jax.jit(compute_losses)  # one compile per shape; eagerly, every op would be dispatched alone
    base = losses(outputs, to_targets(t))
    # Append three padding rows full of huge values and NaN, with "valid" flags set.
    pad_out = {k: np.concatenate([v, np.full((3,) + v.shape[1:], 1e4, np.float32)]) for k, v in outputs.items()}
    pad_out["regime_logits"][-1] = np.nan
    pad_t = {k: np.concatenate([v, np.ones((3,) + v.shape[1:], v.dtype) * (7 if v.dtype != bool else True)])
             for k, v in t.items()}
    pad_t["sample_mask"] = np.arange(8) < 5
    padded, diag = jax.jit(compute_losses_with_diagnostics)(pad_out, to_targets(pad_t))
    chex.assert_trees_all_close(padded, base, rtol=1e-6, atol=1e-7)
    assert not bool(diag.nan_in_outputs)  # NaN on a padding row is not reported
    for name, g in jax.jit(jax.grad(lambda o: sum(compute_losses(o, to_targets(pad_t)).values())))(
        {k: jnp.asarray(v) for k, v in pad_out.items()}
    ).items():
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_array_equal(np.asarray(g)[5:], 0.0)


def test_nan_outputs_replaced_and_reported():
    rng = np.random.default_rng(11)
    outputs = make_outputs(rng)
    t = make_targets(rng)
    clean, diag = compute_losses_with_diagnostics(outputs, to_targets(t))
    assert not bool(diag.nan_in_outputs)
    outputs["anomaly_score"][2, -1, 0] = np.nan
    outputs["anomaly_score"][4, -1, 0] = np.inf
    got, diag = compute_losses_with_diagnostics(outputs, to_targets(t))
    assert bool(diag.nan_in_outputs)
    # Exactly the original's replacement: NaN -> 0 and, in that output, inf -> float32 max
    # (which the +-10 anomaly clamp and +-50 transition clamp then bound).
    fixed = np.nan_to_num(outputs["anomaly_score"], nan=0.0, posinf=np.finfo(np.float32).max)
    want = ref.reference_losses({**outputs, "anomaly_score": fixed}, t)
    for task in ("transition", "anomaly"):
        np.testing.assert_allclose(float(got[task]), want[task], rtol=1e-5, err_msg=task)
    assert all(np.isfinite(float(v)) for v in got.values())


def test_bf16_outputs_are_scored_in_f32():
    rng = np.random.default_rng(12)
    outputs = {k: jnp.asarray(v, jnp.bfloat16) for k, v in make_outputs(rng).items()}
    got = compute_losses(outputs, to_targets(make_targets(rng)))
    for v in got.values():
        assert v.dtype == jnp.float32


def test_valid_counts_in_diagnostics():
    rng = np.random.default_rng(13)
    t = make_targets(rng, n_real=6)
    _, diag = compute_losses_with_diagnostics(make_outputs(rng), to_targets(t))
    real = t["sample_mask"]
    assert int(diag.n_valid["regime"]) == int((t["phase_valid"] & real).sum())
    assert int(diag.n_valid["casualty"]) == int((t["casualty_valid"] & real).sum())
    assert int(diag.n_valid["forecast"]) == int((t["forecast_masks"][..., :6] & real[:, None, None]).sum())


# --- jit / no-jit / pmap ----------------------------------------------------


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_variants_agree(self):
        rng = np.random.default_rng(14)
        outputs = {k: jnp.asarray(v) for k, v in make_outputs(rng).items()}
        targets = to_targets(make_targets(rng, n_real=7))
        expected = compute_losses(outputs, targets)
        got = self.variant(compute_losses)(outputs, targets)
        chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)


def _shard(tree, n):
    return jax.tree_util.tree_map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


@pytest.mark.parametrize("scenario", ["all_valid", "mixed", "mostly_invalid", "padding_rows", "no_regime_targets"])
def test_pmap_four_devices_equals_one_device(scenario):
    n = 4
    assert jax.local_device_count() >= n, "tests/conftest.py sets 4 host devices"
    rng = np.random.default_rng(15)
    outputs = {k: jnp.asarray(v) for k, v in make_outputs(rng, b=8).items()}
    t = make_targets(rng, b=8, **SCENARIOS[scenario])
    if scenario == "mostly_invalid":
        # Some devices then hold no valid regime row at all: the psum'd statistics still agree.
        t["phase_valid"] = np.array([False] * 6 + [True, True])
    targets = to_targets(t)
    single = compute_losses(outputs, targets)
    sharded = jax.pmap(lambda o, tt: compute_losses(o, tt, axis_name="batch"), axis_name="batch")(
        _shard(outputs, n), _shard(targets, n)
    )
    for task in single:
        chex.assert_trees_all_close(sharded[task], jnp.full((n,), single[task]), rtol=2e-5, atol=1e-7)


# --- temporal regulariser ---------------------------------------------------


def test_temporal_regularization_matches_reference():
    rng = np.random.default_rng(16)
    outputs = make_outputs(rng, m=6)
    # A rising casualty trend gives a positive correlation penalty.
    outputs["casualty_pred"] += np.linspace(0, 3, 6)[None, :, None].astype(np.float32)
    total, parts = temporal_regularization(outputs)
    cas = outputs["casualty_pred"].astype(np.float64)
    want = ref.reference_temporal_regularization(cas, outputs["regime_logits"])
    want_cas = want - 0.01 * ref.reference_temporal_regularization.regime_corr
    np.testing.assert_allclose(0.01 * float(parts["casualty_corr"]) + 0.001 * float(parts["casualty_smooth"]),
                               want_cas, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.01 * (float(parts["casualty_corr"]) + float(parts["regime_corr"]))
                               + 0.001 * float(parts["casualty_smooth"]), rtol=1e-6)
    assert float(parts["casualty_corr"]) > 0.1
    # The regime term correlates the class-mean of a softmax (1/K at every month): rounding noise
    # divided by 1e-8, as in the original; it is a correlation, so it stays within [0, ~1].
    assert 0.0 <= float(parts["regime_corr"]) <= 1.0 + 1e-3
    assert set(parts) == {"casualty_corr", "casualty_smooth", "regime_corr"}


def test_nan_task_is_excluded_without_poisoning_gradients():
    priors = {t.name: t.prior for t in tasks.tasks()}
    rng = np.random.default_rng(17)
    outputs = {k: jnp.asarray(v) for k, v in make_outputs(rng).items()}
    t = make_targets(rng, p_valid=1.0)
    t["forecast_targets"][0, -1, 0] = np.nan  # a corrupt target at a valid position
    targets = to_targets(t)
    losses = compute_losses(outputs, targets)
    assert np.isnan(float(losses["forecast"]))

    def total(o):
        return aggregate(compute_losses(o, targets), init_log_vars(priors))[0]

    value, info = aggregate(losses, init_log_vars(priors))
    assert np.isfinite(float(value)) and not bool(info.included["forecast"])
    grads = jax.jit(jax.grad(total))(outputs)
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), name
    np.testing.assert_array_equal(np.asarray(grads["forecast_pred"]), 0.0)
    assert np.abs(np.asarray(grads["regime_logits"])).sum() > 0  # the other tasks still learn
