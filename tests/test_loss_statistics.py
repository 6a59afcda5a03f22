"""loss_statistics / merge_statistics / finalize_losses: a split scored in pieces gets one batch's losses.

The task losses use batch statistics (class weights from counts, variances,
mean probabilities, fallbacks when no row is valid), so their value depends on
how a split is cut into batches. Scoring each piece to sufficient statistics,
merging them (on the host, in float64) and finalising once must give
``compute_losses`` of the whole split as one batch, whatever the cuts.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_jax.config import LossConfig
from han_jax.core.reductions import Moments, masked_moments, masked_var, merge_statistics
from han_jax.objective import (
    compute_losses,
    compute_losses_with_diagnostics,
    finalize_losses,
    loss_statistics,
    statistics_to_host,
)
from tests import reference_losses as ref
from tests.test_losses import make_outputs, make_targets, to_targets

B = 24
NONE_BRANCHES = {
    "no_regime_targets": ("phase_index", "is_transition"),
    "no_casualty_targets": ("fatalities",),
    "no_anomaly_targets": ("anomaly",),
    "no_forecast_targets": ("forecast_targets",),
    "no_targets_at_all": ("phase_index", "is_transition", "fatalities", "anomaly", "forecast_targets"),
}


def random_split_batch(seed, b=B, m=3, k=4, none=(), p_valid=None, n_pad=None, scales=None, **target_kw):
    """A batch with padding rows anywhere (full of garbage) and per-task validity rates.

    p_valid: per validity mask, its rate; 0 makes that task invalid on the whole batch.
    scales: per output, a factor; drawn from {0.2, 1, 4} by default. Small anomaly and
      forecast predictions switch the variance penalties on, large regime logits the
      entropy penalties, so that every batch statistic matters in some examples.
    """
    rng = np.random.default_rng(seed)
    outputs = make_outputs(rng, b=b, m=m, k=k, h=max(m, 2))
    for key in ("regime_logits", "anomaly_score", "forecast_pred"):
        outputs[key] *= np.float32((scales or {}).get(key, rng.choice([0.2, 1.0, 4.0])))
    t = make_targets(rng, b=b, m=m, none=none, **target_kw)
    for key, rate in (p_valid or {}).items():
        if t.get(key) is not None:
            t[key] = rng.random(t[key].shape) < rate
    n_pad = int(rng.integers(0, 6)) if n_pad is None else n_pad
    pad = np.zeros(b, bool)
    pad[rng.choice(b, n_pad, replace=False)] = True
    t["sample_mask"] = ~pad
    for v in outputs.values():
        v[pad] = 1e4  # garbage in padding rows must not count anywhere
    return outputs, t


def take_rows(outputs, t, start, stop, pad_to=None):
    """Rows ``[start, stop)`` as a batch, padded with garbage rows up to ``pad_to`` rows if given.

    Padding keeps every piece the same shape (one compile), as the eval loop's partial batches.
    """
    n_pad = 0 if pad_to is None else pad_to - (stop - start)
    idx = np.concatenate([np.arange(start, stop), np.zeros(n_pad, int)])
    real = np.arange(len(idx)) < stop - start
    sub_outputs = {key: np.where(real.reshape((-1,) + (1,) * (v.ndim - 1)), v[idx], np.float32(-3e3))
                   for key, v in outputs.items()}
    sub_t = {key: (None if v is None else v[idx]) for key, v in t.items()}
    sub_t["sample_mask"] = sub_t["sample_mask"] & real
    return sub_outputs, to_targets(sub_t)


@functools.lru_cache(maxsize=None)
def jitted(fn, config):
    return jax.jit(functools.partial(fn, config=config))


def accumulate(outputs, t, cuts, config=LossConfig(), pad_to=None):
    """Statistics of the pieces ``[cuts[i], cuts[i+1])``, merged on the host in float64."""
    bounds = [0, *cuts, len(t["sample_mask"])]
    total = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        stats = jitted(loss_statistics, config)(*take_rows(outputs, t, start, stop, pad_to))
        stats = statistics_to_host(stats)
        total = stats if total is None else merge_statistics(total, stats)
    return total


def assert_split_matches_whole(outputs, t, cuts, config=LossConfig(), pad_to=None, rtol=1e-5, atol=1e-6):
    whole, diag = jitted(compute_losses_with_diagnostics, config)(outputs, to_targets(t))
    got, n_valid = finalize_losses(accumulate(outputs, t, cuts, config, pad_to), config)
    assert set(got) == set(whole)
    for task in whole:
        np.testing.assert_allclose(float(got[task]), float(whole[task]), rtol=rtol, atol=atol, err_msg=task)
        assert float(n_valid[task]) == float(diag.n_valid[task]), task


def even_cuts(size, b=B):
    return list(range(size, b, size))


# --- one batch ----------------------------------------------------------------


@pytest.mark.parametrize("branch", ["targets", "padding_and_invalid", *NONE_BRANCHES])
def test_compute_losses_is_finalized_statistics(branch):
    if branch == "padding_and_invalid":
        outputs, t = random_split_batch(1, p_valid={"phase_valid": 0.0, "anomaly_valid": 0.1}, n_pad=5)
    else:
        outputs, t = random_split_batch(1, none=NONE_BRANCHES.get(branch, ()))
    targets = to_targets(t)
    want, diag = jitted(compute_losses_with_diagnostics, LossConfig())(outputs, targets)
    stats = jitted(loss_statistics, LossConfig())(outputs, targets)
    direct, n_valid = finalize_losses(stats)
    chex.assert_trees_all_close(direct, want, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(n_valid, diag.n_valid, rtol=0, atol=0)
    # Accumulating this one batch on the host (float64), alone or with a piece of padding only.
    host = statistics_to_host(stats)
    only, _ = finalize_losses(host)
    chex.assert_trees_all_close(only, want, rtol=1e-6, atol=1e-9)
    pad_out, pad_t = make_outputs(np.random.default_rng(2), b=3), make_targets(np.random.default_rng(2), b=3)
    pad_t = {key: (None if t[key] is None else v) for key, v in pad_t.items()}
    pad_t["sample_mask"] = np.zeros(3, bool)
    padding_only = statistics_to_host(jitted(loss_statistics, LossConfig())(pad_out, to_targets(pad_t)))
    with_padding, _ = finalize_losses(merge_statistics(host, padding_only))
    chex.assert_trees_all_close(with_padding, want, rtol=1e-6, atol=1e-9)


def test_statistics_jit_and_pytree():
    outputs, t = random_split_batch(3)
    targets = to_targets(t)
    eager = loss_statistics(outputs, targets)
    jitted = jax.jit(loss_statistics, static_argnums=2)(outputs, targets, LossConfig())
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)
    assert isinstance(eager["anomaly"]["pred"], Moments) and isinstance(eager["forecast"]["target"], Moments)
    # Merging also runs under jit on device arrays, and agrees with the float64 host merge.
    on_device = jax.jit(merge_statistics)(eager, eager)
    on_host = merge_statistics(statistics_to_host(eager), statistics_to_host(eager))
    chex.assert_trees_all_close(jax.device_get(on_device), on_host, rtol=1e-6, atol=1e-5)
    assert on_host["regime"]["class_count"].dtype == np.float64
    assert on_host["forecast"]["pred"].m2.dtype == np.float64


def test_expected_statistic_keys():
    outputs, t = random_split_batch(4)
    stats = loss_statistics(outputs, to_targets(t))
    assert set(stats["regime"]) == {"last_sq_sum", "last_sq_count", "class_count", "class_correct", "label_nll_sum",
                                    "all_nll_sum", "probs_sum", "entropy_sum", "n_valid"}
    assert stats["regime"]["class_count"].shape == (4,)
    assert set(stats["transition"]) == {"score_sq_sum", "n_rows", "loss_sum", "n_valid", "positives",
                                        "predicted_positives", "true_positives"}
    assert set(stats["casualty"]) == {"pi_reg_sum", "log_mu_sq_sum", "theta_reg_sum", "n_rows", "nll_sum", "n_valid",
                                      "abs_error_sum"}
    assert set(stats["anomaly"]) == {"score_sq_sum", "n_rows", "sq_err_sum", "n_valid", "pred", "target"}
    assert set(stats["forecast"]) == {"pred_sq_sum", "pred_sq_count", "sq_err_sum", "n_valid", "pred", "target",
                                      "smooth_sum", "smooth_count", "month_var_sum", "month_var_count",
                                      "next_sq_err", "next_count"}
    assert set(stats["daily_forecast"]) == {"pred_sq_sum", "pred_sq_count", "smooth_sum", "smooth_count"}


# --- Moments ----------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), cut=st.integers(0, 12), p=st.sampled_from([0.0, 0.2, 0.8]))
def test_moments_merge_is_the_variance_of_the_union(seed, cut, p):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=12) * 3 + 5).astype(np.float32)
    where = rng.random(12) < p
    var, n = masked_var(jnp.asarray(x), jnp.asarray(where))
    whole = masked_moments(jnp.asarray(x), jnp.asarray(where))
    np.testing.assert_allclose(float(whole.variance()), float(var), rtol=1e-7)
    assert float(whole.count) == float(n) == where.sum()
    parts = [statistics_to_host(masked_moments(jnp.asarray(x[s]), jnp.asarray(where[s])))
             for s in (slice(0, cut), slice(cut, 12))]
    merged = parts[0].merge(parts[1])
    assert merged.count == where.sum()
    if where.sum() >= 2:
        np.testing.assert_allclose(merged.variance(), np.var(x[where].astype(np.float64), ddof=1), rtol=1e-5)
    else:
        assert merged.variance() == 0.0 and np.isfinite(merged.mean)  # empty or single: 0 as masked_var


# --- pieces == whole --------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 7, 24])
def test_even_pieces_give_the_whole_batch(size):
    # 24 = 3*7 + 3: the 7-row pieces end with an uneven one.
    # Scales at which the variance and entropy penalties are on.
    scales = {"regime_logits": 4.0, "anomaly_score": 0.2, "forecast_pred": 0.2}
    outputs, t = random_split_batch(10 + size, p_valid={"phase_valid": 0.3, "casualty_valid": 0.5}, scales=scales)
    assert_split_matches_whole(outputs, t, even_cuts(size))
    # And the independent numpy oracle of the original, on the whole batch.
    got, _ = finalize_losses(accumulate(outputs, t, even_cuts(size)))
    want = ref.reference_losses(outputs, t)
    for task in want:
        np.testing.assert_allclose(float(got[task]), want[task], rtol=2e-5, atol=1e-6, err_msg=task)


VALIDITY = st.fixed_dictionaries({
    key: st.sampled_from([0.0, 0.1, 0.6, 1.0])
    for key in ("phase_valid", "casualty_valid", "anomaly_valid", "forecast_masks")
})


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(1, B - 1), max_size=6, unique=True).map(sorted),
    p_valid=VALIDITY,
)
def test_random_pieces_give_the_whole_batch(seed, cuts, p_valid):
    # Every piece is presented as a B-row batch padded at the end (the rows' own shape is
    # covered by the even-pieces test), so hypothesis' examples share one compile.
    outputs, t = random_split_batch(seed, p_valid=p_valid)
    assert_split_matches_whole(outputs, t, cuts, pad_to=B)


@pytest.mark.parametrize("branch", sorted(NONE_BRANCHES))
@pytest.mark.parametrize("m", [1, 3])
def test_no_target_branches_round_trip(branch, m):
    outputs, t = random_split_batch(20 + m, m=m, none=NONE_BRANCHES[branch])
    assert_split_matches_whole(outputs, t, [1, 4, 11, 12], pad_to=12)


def test_other_heads_and_options_round_trip():
    # 11-class head (phases directly), focal transitions, supervised daily forecast with -999 sentinels.
    outputs, t = random_split_batch(30, k=11)
    rng = np.random.default_rng(30)
    h, d = outputs["daily_forecast_pred"].shape[1:]
    t["daily_forecast_targets"] = np.where(rng.random((B, h, d)) < 0.2, -999.0,
                                           rng.normal(size=(B, h, d))).astype(np.float32)
    t["daily_forecast_masks"] = rng.random((B, h, d)) < 0.7
    config = LossConfig(transition_focal=True, daily_forecast_latent=False)
    assert_split_matches_whole(outputs, t, [5, 6, 17], config, pad_to=B)
    t["daily_forecast_masks"][:12] = False  # the first pieces hold no valid daily position
    assert_split_matches_whole(outputs, t, [2, 9], config, pad_to=B)
    t["daily_forecast_targets"] = t["daily_forecast_masks"] = None
    assert_split_matches_whole(outputs, t, [2, 9], config, pad_to=B)


def test_nan_outputs_and_nan_targets_round_trip():
    outputs, t = random_split_batch(40, n_pad=0)
    outputs["anomaly_score"][3, -1, 0] = np.nan  # replaced by 0 in the whole batch and in its piece
    outputs["regime_logits"][17, 0, 1] = np.nan
    assert_split_matches_whole(outputs, t, [7, 14])
    t["forecast_masks"][5, 0, 0] = True
    t["forecast_targets"][5, 0, 0] = np.nan  # a corrupt valid target: NaN for the whole split
    got, _ = finalize_losses(accumulate(outputs, t, [7, 14]))
    assert np.isnan(float(got["forecast"])) and np.isnan(float(compute_losses(outputs, to_targets(t))["forecast"]))


def test_devices_give_the_whole_batch():
    n = 4
    assert jax.local_device_count() >= n, "tests/conftest.py sets 4 host devices"
    outputs, t = random_split_batch(50, b=8, p_valid={"phase_valid": 0.5})
    t["phase_valid"][:] = np.arange(8) >= 6  # three devices hold no valid regime row
    targets = to_targets(t)
    want = compute_losses(outputs, targets)

    def shard(tree):
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x).reshape((n, -1) + x.shape[1:]), tree)

    # With axis_name the statistics are global: every device holds the whole batch's.
    replicated = jax.pmap(lambda o, tt: loss_statistics(o, tt, axis_name="d"), axis_name="d")(
        shard(outputs), shard(targets))
    first = jax.tree_util.tree_map(lambda x: x[0], replicated)
    chex.assert_trees_all_close(finalize_losses(first)[0], want, rtol=2e-5, atol=1e-7)
    # Without it each device's statistics are its own rows'; merged on the host, the same.
    local = jax.pmap(loss_statistics)(shard(outputs), shard(targets))
    host = statistics_to_host(local)
    merged = functools.reduce(merge_statistics,
                              [jax.tree_util.tree_map(lambda x, i=i: x[i], host) for i in range(n)])
    chex.assert_trees_all_close(finalize_losses(merged)[0], want, rtol=1e-5, atol=1e-7)
