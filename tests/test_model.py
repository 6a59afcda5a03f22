"""Tests for han_jax.model.MultiResolutionHAN (small config except where noted)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax.config import ModelConfig
from han_jax.core.batch import Inputs
from han_jax.core.precision import Policy
from han_jax.model import MultiResolutionHAN
from han_jax.model.attention import AttentionCore, MultiheadAttention, combine_masks
from han_jax.model.common import unmask_first_if_all_masked
from han_jax.model.daily_encoder import DailySourceEncoder
from han_jax.model.daily_temporal import local_window_valid
from han_jax.model.han import observation_density
from han_jax.model.monthly_aggregation import month_masks
from han_jax.model.temporal_encoder import TemporalEncoder
from han_jax.training.steps import jit_forward

SMALL = ModelConfig.small()
B, T, M = 2, 60, 3

EXPECTED_TOP_LEVEL = {
    "daily_encoders_personnel": 598_912,
    "daily_encoders_drones": 598_144,
    "daily_encoders_armor": 598_144,
    "daily_encoders_artillery": 599_680,
    "daily_fusion": 1_384_904,
    "daily_temporal_encoder": 381_957,
    "monthly_aggregation": 230_144,
    "monthly_encoder": 2_242_186,
    "cross_resolution_fusion": 743_680,
    "temporal_encoder": 396_800,
    "casualty_head": 67_206,
    "regime_head": 66_948,
    "anomaly_head": 66_561,
    "forecast_head": 108_323,
    "daily_forecast_head": 100_096,
    "uncertainty_estimator": 8_321,
}
OUT_KEYS = {
    "temporal_output", "casualty_pred", "casualty_var", "regime_logits", "anomaly_score",
    "forecast_pred", "daily_forecast_pred", "source_importance", "uncertainty",
}


def boundaries(b, t, m, month_len=20):
    """Contiguous months ending at t (the last month ends at the target day)."""
    ends = t - month_len * np.arange(m)[::-1]
    starts = np.maximum(ends - month_len, 0)
    bnd = np.stack([starts, ends], -1)
    return jnp.asarray(np.broadcast_to(bnd, (b, m, 2)).astype(np.int32))


def make_inputs(cfg, b=B, t=T, m=M, seed=0, p_obs=0.8):
    rs = np.random.RandomState(seed)
    df, dm, mf, mm = {}, {}, {}, {}
    for name, f in cfg.daily_sources:
        day_obs = rs.rand(b, t, 1) < p_obs  # features of a day share one status (as in the data)
        dm[name] = jnp.asarray(np.broadcast_to(day_obs, (b, t, f)))
        df[name] = jnp.asarray(np.where(day_obs, rs.randn(b, t, f), 0.0).astype(np.float32))
    for name, f in cfg.monthly_sources:
        obs = rs.rand(b, m, f) < p_obs
        mm[name] = jnp.asarray(obs)
        mf[name] = jnp.asarray(np.where(obs, rs.randn(b, m, f), 0.0).astype(np.float32))
    return Inputs(df, dm, mf, mm, boundaries(b, t, m))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def session_model(tiny):
    """The session's tiny model: its configuration, parameters, a batch of the session's shapes and its compiled
    forward (``jit_forward``, shared with the run tests): these tests add no compile of their own."""
    cfg = tiny.spec.model
    forward = jit_forward(tiny.spec)
    return cfg, {"params": tiny.state.params}, make_inputs(cfg, b=8), lambda v, x: forward(v["params"], x)


@pytest.fixture(scope="module")
def small():
    model = MultiResolutionHAN(config=SMALL, policy=Policy())
    inputs = make_inputs(SMALL)
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, deterministic=True))(jax.random.PRNGKey(0), inputs)
    jitted = jax.jit(lambda v, x, k: model.apply(v, x, deterministic=True, rngs={"dropout": k}))
    apply_det = lambda v, x, k=jax.random.PRNGKey(0): jitted(v, x, k)  # one compile shared by the tests
    return model, variables, inputs, apply_det


def test_default_param_count_and_per_module():
    cfg = ModelConfig()
    model = MultiResolutionHAN(config=cfg, policy=Policy())
    inputs = make_inputs(cfg, b=1, t=365, m=12)
    shapes = jax.eval_shape(lambda k: model.init({"params": k}, inputs, deterministic=True), jax.random.PRNGKey(0))
    assert set(shapes) == {"params"}  # no batch stats or other collections
    assert count(shapes["params"]) == 8_192_006
    assert {k: count(v) for k, v in shapes["params"].items()} == EXPECTED_TOP_LEVEL


def test_no_latent_forecast_head_shapes():
    cfg = dataclasses.replace(SMALL, use_latent_forecast=False)
    model = MultiResolutionHAN(config=cfg, policy=Policy())
    inputs = make_inputs(cfg)
    out = jax.eval_shape(
        lambda k: model.init_with_output({"params": k}, inputs, deterministic=True)[0], jax.random.PRNGKey(0)
    )
    assert out["daily_forecast_pred"].shape == (B, cfg.daily_forecast_horizon, cfg.n_daily_features)


@pytest.mark.parametrize("policy_name", ["f32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_output_keys_shapes_dtypes(session_model, policy_name):
    cfg, variables, inputs, apply_f32 = session_model
    policy = Policy.from_string(policy_name)
    if policy_name == "f32":
        out = apply_f32(variables, inputs)
    else:
        model = MultiResolutionHAN(config=cfg, policy=policy)
        out = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(variables, inputs)
    assert set(out) == OUT_KEYS
    b, d, fm = inputs.month_boundaries.shape[0], cfg.d_model, cfg.n_monthly_features
    chex.assert_shape(out["temporal_output"], (b, M, d))
    chex.assert_shape([out["casualty_pred"], out["casualty_var"]], (b, M, 3))
    chex.assert_shape(out["regime_logits"], (b, M, cfg.n_regime_classes))
    chex.assert_shape([out["anomaly_score"], out["uncertainty"]], (b, M, 1))
    chex.assert_shape(out["forecast_pred"], (b, M, fm))
    chex.assert_shape(out["daily_forecast_pred"], (b, cfg.daily_forecast_horizon, d))
    chex.assert_shape(out["source_importance"], (b, M, len(cfg.monthly_sources)))
    chex.assert_type(list(out.values()), jnp.float32)
    chex.assert_tree_all_finite(out)
    chex.assert_type(jax.tree_util.tree_leaves(variables), jnp.float32)
    np.testing.assert_allclose(out["source_importance"].sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(out["casualty_var"] > 0)) and bool(jnp.all(out["uncertainty"] > 0))
    if policy_name == "bf16":
        ref = apply_f32(variables, inputs)
        diff = jnp.abs(out["temporal_output"] - ref["temporal_output"])
        assert float(diff.max()) > 0  # the compute dtype really changed
        assert float(diff.mean()) < 0.1  # ... but it is the same model


def test_bf16_policy_computes_in_bf16():
    policy = Policy.from_string("bf16")
    x = jnp.ones((2, 5, 8))
    mha = MultiheadAttention(num_heads=2, dropout=0.0, policy=policy)
    v = mha.init(jax.random.PRNGKey(0), x, x, x, deterministic=True)
    chex.assert_type(jax.tree_util.tree_leaves(v), jnp.float32)
    out, probs = mha.apply(v, x, x, x, deterministic=True)
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_type(probs, jnp.float32)  # softmax in f32


def test_initialisers_follow_the_original(session_model):
    cfg, variables = session_model[:2]
    p, d = variables["params"], cfg.d_model
    enc = p["daily_encoders_personnel"]
    np.testing.assert_array_equal(enc["feature_projection"]["dense"]["bias"], 0.0)  # xavier, zero bias
    assert float(jnp.abs(enc["feature_projection"]["dense"]["kernel"]).max()) <= np.sqrt(6 / (12 + d))
    attn = enc["layers_0"]["self_attn"]
    np.testing.assert_array_equal(attn["in_proj_bias"], 0.0)
    np.testing.assert_array_equal(attn["out_proj"]["dense"]["bias"], 0.0)
    assert 0.005 < float(jnp.std(enc["observation_status_embedding"]["embedding"])) < 0.05  # N(0, 0.02)
    conv = p["daily_fusion"]["source_gate"]["multi_scale_convs_0"]["conv"]  # torch default U(+-1/sqrt(fan_in))
    bound = 1 / np.sqrt(2 * d * 3)
    assert float(jnp.abs(conv["kernel"]).max()) <= bound and float(jnp.abs(conv["bias"]).max()) <= bound
    assert float(jnp.abs(conv["bias"]).max()) > 0
    gate_pos = p["daily_fusion"]["source_gate"]["temporal_encoding"]["position_embedding"]["embedding"]
    assert 0.015 < float(jnp.std(gate_pos)) < 0.025  # re-initialised to N(0, 0.02)
    assert 0.7 < float(jnp.std(p["daily_temporal_encoder"]["month_embedding"]["embedding"])) < 1.3  # torch N(0, 1)
    q = p["monthly_aggregation"]["month_queries"]
    assert abs(float(jnp.std(q)) - d**-0.5) < 0.03
    np.testing.assert_allclose(p["daily_temporal_encoder"]["residual_scale"], 0.1)
    np.testing.assert_array_equal(p["daily_temporal_encoder"]["pos_scale"], 1.0)


def _with(inputs, **changes):
    return dataclasses.replace(inputs, **changes)


def test_finite_when_everything_missing(session_model):
    _, variables, inputs, apply_det = session_model
    garbage = lambda d: {k: jnp.full_like(v, -999.0) for k, v in d.items()}
    nothing = lambda d: {k: jnp.zeros_like(v, dtype=bool) for k, v in d.items()}
    empty = _with(
        inputs,
        daily_features=garbage(inputs.daily_features), daily_masks=nothing(inputs.daily_masks),
        monthly_features=garbage(inputs.monthly_features), monthly_masks=nothing(inputs.monthly_masks),
    )
    out = apply_det(variables, empty)
    chex.assert_tree_all_finite(out)
    # Unobserved values never reach the network: the sentinel and zeros give the same outputs.
    zeros = _with(
        empty,
        daily_features={k: jnp.zeros_like(v) for k, v in inputs.daily_features.items()},
        monthly_features={k: jnp.zeros_like(v) for k, v in inputs.monthly_features.items()},
    )
    chex.assert_trees_all_close(out, apply_det(variables, zeros))


def test_finite_when_one_source_missing(session_model):
    cfg, variables, inputs, apply_det = session_model
    dname, mname = cfg.daily_source_names[0], cfg.monthly_source_names[1]
    x = _with(
        inputs,
        daily_masks={**inputs.daily_masks, dname: jnp.zeros_like(inputs.daily_masks[dname])},
        monthly_masks={**inputs.monthly_masks, mname: jnp.zeros_like(inputs.monthly_masks[mname])},
    )
    out = apply_det(variables, x)
    chex.assert_tree_all_finite(out)
    ref = apply_det(variables, inputs)
    assert not np.allclose(out["temporal_output"], ref["temporal_output"])


def test_finite_for_degenerate_months_and_extreme_values(session_model):
    _, variables, inputs, apply_det = session_model
    bnd = np.asarray(inputs.month_boundaries).copy()
    bnd[0, 0] = [0, 0]  # padding month
    bnd[0, 1] = [30, 10]  # start > end
    bnd[1, 0] = [T, T]  # start == T
    big = {k: v.at[:, ::7].set(1e5).at[:, 3::7].set(-3e4) for k, v in inputs.daily_features.items()}
    out = apply_det(variables, _with(inputs, month_boundaries=jnp.asarray(bnd), daily_features=big))
    chex.assert_tree_all_finite(out)


@pytest.mark.slow
def test_jit_matches_no_jit(small):
    model, variables, inputs, apply_det = small
    eager = model.apply(variables, inputs, deterministic=True)
    chex.assert_trees_all_close(eager, apply_det(variables, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dropout(small):
    model, variables, inputs, apply_det = small
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    # deterministic=True: the dropout rng is ignored.
    chex.assert_trees_all_equal(apply_det(variables, inputs, k1), apply_det(variables, inputs, k2))
    f = jax.jit(lambda v, x, k: model.apply(v, x, deterministic=False, rngs={"dropout": k}))
    a, b = f(variables, inputs, k1), f(variables, inputs, k2)
    chex.assert_tree_all_finite(a)
    assert not np.allclose(a["temporal_output"], b["temporal_output"])
    chex.assert_trees_all_equal(a, f(variables, inputs, k1))


@pytest.mark.slow
def test_remat_and_return_attention(small):
    """remat changes nothing numerically; return_attention only adds the maps."""
    _, variables, inputs, apply_det = small
    model = MultiResolutionHAN(config=dataclasses.replace(SMALL, remat=True, return_attention=True), policy=Policy())
    out = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(variables, inputs)
    ref = apply_det(variables, inputs)
    chex.assert_trees_all_close({k: out[k] for k in ref}, ref, rtol=1e-5, atol=1e-6)
    key = "cross_resolution_attention/layer_0/a_to_b"
    assert key in out and "cross_resolution_attention/layer_0/b_to_a" in out
    chex.assert_shape(out[key], (B, SMALL.nhead, M, M))
    np.testing.assert_allclose(out[key].sum(-1), 1.0, rtol=1e-5)


# ----- causality of the modules that are causal in the original -----


def _perturb_future(x, t0, seed=1):
    noise = jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
    return x.at[:, t0:].add(3.0 * noise[:, t0:])


def test_daily_source_encoder_is_causal():
    enc = DailySourceEncoder(
        n_features=5, d_model=16, nhead=4, num_layers=1, dropout=0.1, causal=True, max_len=100, policy=Policy()
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 5))
    m = jax.random.uniform(jax.random.PRNGKey(1), (2, 40, 1)) < 0.7
    m = jnp.broadcast_to(m, x.shape).at[:, :3].set(False)  # leading unobserved days
    v = enc.init(jax.random.PRNGKey(2), x, m, deterministic=True)
    f = jax.jit(lambda x, m: enc.apply(v, x, m, deterministic=True))
    t0 = 25
    y0 = f(x, m)
    y1 = f(_perturb_future(x, t0), m.at[:, t0:].set(~m[:, t0:]))
    chex.assert_tree_all_finite(y0)
    chex.assert_trees_all_close(y0[:, :t0], y1[:, :t0], atol=1e-6)
    assert not np.allclose(y0[:, t0:], y1[:, t0:])


def test_local_window_attention_is_causal_and_windowed():
    t, w = 50, 31
    mha = MultiheadAttention(num_heads=4, dropout=0.0, policy=Policy())
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, 16))
    obs = jnp.ones((2, t), bool).at[1, :10].set(False)
    valid = combine_masks(unmask_first_if_all_masked(obs), local_window_valid(t, w))
    v = mha.init(jax.random.PRNGKey(1), x, x, x, valid=valid, deterministic=True)
    f = jax.jit(lambda x: mha.apply(v, x, x, x, valid=valid, deterministic=True)[0])
    y0 = f(x)
    chex.assert_tree_all_finite(y0)
    # Row 1's first 10 days have no observed key in their window: zero output, not an average.
    chex.assert_trees_all_equal(y0[1, 1:10], jnp.zeros_like(y0[1, 1:10]) + mha.apply(
        v, jnp.zeros((1, 1, 16)), jnp.zeros((1, 1, 16)), jnp.zeros((1, 1, 16)),
        valid=jnp.zeros((1, 1, 1, 1), bool), deterministic=True)[0][0, 0])
    t0 = 35
    y1 = f(_perturb_future(x, t0))
    chex.assert_trees_all_close(y0[:, :t0], y1[:, :t0], atol=1e-6)
    # Window: day t sees days t-30..t only; changing day 3 leaves days >= 34 unchanged.
    y2 = f(x.at[:, 3].add(5.0))
    chex.assert_trees_all_close(y0[:, 34:], y2[:, 34:], atol=1e-6)
    assert not np.allclose(y0[0, 33], y2[0, 33])


def test_temporal_encoder_is_causal():
    enc = TemporalEncoder(
        d_model=16, nhead=4, num_layers=2, dropout=0.1, causal=True, max_len=60, policy=Policy()
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16))
    mask = jnp.ones((2, 12), bool).at[0, :2].set(False)
    v = enc.init(jax.random.PRNGKey(1), x, mask, deterministic=True)
    f = jax.jit(lambda x, mk: enc.apply(v, x, mk, deterministic=True))
    y0 = f(x, mask)
    y1 = f(_perturb_future(x, 7), mask.at[:, 7:].set(False))
    chex.assert_tree_all_finite(y0)
    chex.assert_trees_all_close(y0[:, :7], y1[:, :7], atol=1e-6)
    assert not np.allclose(y0[:, 7:], y1[:, 7:])


# ----- masking rules -----


@pytest.mark.parametrize("fused", [False, True])
def test_attention_core_zero_rows_and_softmax(fused):
    core = AttentionCore(dropout=0.0, policy=Policy(), fused=fused)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 2, 4))
    v = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 2, 4))
    valid = jnp.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], bool)[None, None]
    (out, probs) = core.apply({}, q, k, v, valid, True)
    chex.assert_trees_all_equal(out[0, 1], jnp.zeros((2, 4)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    ref = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), -1)
    np.testing.assert_allclose(probs[0, :, 0], ref[0, :, 0], rtol=1e-5)
    np.testing.assert_allclose(probs[0, :, 2, 4], 1.0, rtol=1e-6)
    weights = jnp.where(jnp.any(valid, -1, keepdims=True), ref, 0.0)  # the row with no valid key is NaN in ref
    np.testing.assert_allclose(out, jnp.einsum("bhqk,bkhd->bqhd", weights, v), rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(jax.grad(lambda q: core.apply({}, q, k, v, valid, True)[0].sum())(q))


def test_unmask_first_key():
    kv = jnp.array([[False, False, False], [False, True, False]])
    np.testing.assert_array_equal(unmask_first_if_all_masked(kv), [[True, False, False], [False, True, False]])


def test_month_masks_match_reference_loop():
    rs = np.random.RandomState(0)
    b, m, t = 3, 4, 20
    day_valid = rs.rand(b, t) < 0.3
    day_valid[0] = False
    bnd = np.sort(rs.randint(0, t + 3, size=(b, m, 2)), -1)
    bnd[1, 2] = [7, 3]
    attn_valid, key_valid, _ = month_masks(jnp.asarray(bnd), jnp.asarray(day_valid), t)
    # The original's loop, in numpy (True = masked).
    kpm = ~day_valid
    kpm[kpm.all(-1), 0] = False
    tt = np.arange(t)
    am = (tt < bnd[..., :1]) | (tt >= bnd[..., 1:])
    need = (am | kpm[:, None]).all(-1)
    for i in range(b):
        for j in range(m):
            if need[i, j] and bnd[i, j, 0] < t:
                am[i, j, bnd[i, j, 0]] = False
                kpm[i, bnd[i, j, 0]] = False
    np.testing.assert_array_equal(attn_valid, ~am)
    np.testing.assert_array_equal(key_valid, ~kpm)


def test_observation_density_matches_reference_loop():
    rs = np.random.RandomState(1)
    b, m, t = 2, 3, 15
    daily = [rs.rand(b, t) < 0.5 for _ in range(2)]
    monthly = [rs.rand(b, m) < 0.5 for _ in range(3)]
    bnd = np.array([[[0, 5], [5, 10], [10, 15]], [[3, 3], [9, 4], [4, 15]]], np.int32)
    got = observation_density([jnp.asarray(x) for x in daily], [jnp.asarray(x) for x in monthly], jnp.asarray(bnd))
    dd = np.zeros((b, m))
    for o in daily:
        for i in range(b):
            for j in range(m):
                s, e = bnd[i, j]
                if s < e and e <= t:
                    dd[i, j] += o[i, s:e].mean()
    ref = np.clip(0.6 * dd / len(daily) + 0.4 * sum(x.astype(float) for x in monthly) / len(monthly), 0, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.slow
def test_full_default_forward():
    """One forward of the default model (B=2, T=365, M=12); random parameters filled with
    numpy to skip the slow RNG-heavy init compile."""
    cfg = ModelConfig()
    model = MultiResolutionHAN(config=cfg, policy=Policy())
    inputs = make_inputs(cfg, b=2, t=365, m=12)
    shapes = jax.eval_shape(lambda k: model.init({"params": k}, inputs, deterministic=True), jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rs.normal(0, 0.05, s.shape).astype(s.dtype)), shapes)
    out = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(params, inputs)
    assert set(out) == OUT_KEYS
    chex.assert_shape(out["forecast_pred"], (2, 12, 35))
    chex.assert_shape(out["source_importance"], (2, 12, 5))
    chex.assert_shape(out["daily_forecast_pred"], (2, 7, 128))
    chex.assert_tree_all_finite(out)


def _with_gain(variables, raw):
    params = dict(variables["params"], forecast_persistence_gain=jnp.asarray(raw, jnp.float32))
    return {"params": params}


@pytest.mark.slow
def test_residual_forecast_adds_the_current_months_observed_inputs_times_a_learnt_gain(small):
    _, variables, inputs, apply_det = small
    residual = MultiResolutionHAN(config=dataclasses.replace(SMALL, forecast_residual=True), policy=Policy())
    shapes = jax.eval_shape(lambda k: residual.init({"params": k}, inputs, deterministic=True), jax.random.PRNGKey(0))
    n_monthly = SMALL.n_monthly_features
    # The option adds exactly one gain per monthly feature, stored as zeros (gain 1: persistence).
    assert count(shapes["params"]) == count(variables["params"]) + n_monthly
    chex.assert_shape(shapes["params"]["forecast_persistence_gain"], (n_monthly,))
    init = residual.init({"params": jax.random.PRNGKey(0)}, inputs, deterministic=True)
    chex.assert_trees_all_equal(init["params"]["forecast_persistence_gain"], jnp.zeros(n_monthly))
    # Unobserved inputs add nothing, whatever value the padding holds.
    padded = inputs.replace(monthly_features={n: jnp.where(inputs.monthly_masks[n], x, 99.0)
                                              for n, x in inputs.monthly_features.items()})
    run = jax.jit(lambda v, x: residual.apply(v, x, deterministic=True))
    want = apply_det(variables, inputs)
    current = jnp.concatenate([jnp.where(inputs.monthly_masks[n], inputs.monthly_features[n], 0.0)
                               for n, _ in SMALL.monthly_sources], axis=-1)
    got = run(_with_gain(variables, jnp.zeros(n_monthly)), padded)
    chex.assert_trees_all_close(got["forecast_pred"], want["forecast_pred"] + current, atol=1e-5)
    chex.assert_trees_all_close({k: v for k, v in got.items() if k != "forecast_pred"},
                                {k: v for k, v in want.items() if k != "forecast_pred"}, atol=1e-6)
    # A per-feature gain: the stored value is the gain's change over han.py's _GAIN_SCALE (30).
    gain = np.linspace(-0.5, 1.5, n_monthly).astype(np.float32)
    got = run(_with_gain(variables, (gain - 1.0) / 30.0), padded)
    chex.assert_trees_all_close(got["forecast_pred"], want["forecast_pred"] + gain * current, atol=1e-5)


@pytest.mark.slow
def test_regime_head_reads_each_months_last_daily_state(small):
    _, variables, inputs, apply_det = small
    cfg = dataclasses.replace(SMALL, regime_daily_state=True)
    model = MultiResolutionHAN(config=cfg, policy=Policy())
    v = model.init({"params": jax.random.PRNGKey(1)}, inputs, deterministic=True)
    d = cfg.d_model
    # Only the regime head's first layer widens: it reads [temporal output, daily state].
    assert count(v["params"]) == count(variables["params"]) + 2 * d * d
    out, inter = jax.jit(lambda v, x: model.apply(v, x, deterministic=True, capture_intermediates=True,
                                                  mutable=["intermediates"]))(v, inputs)
    daily_state = inter["intermediates"]["daily_temporal_encoder"]["__call__"][0]
    last_day = np.clip(np.asarray(inputs.month_boundaries)[..., 1] - 1, 0, daily_state.shape[1] - 1)
    want_in = jnp.concatenate([out["temporal_output"],
                               jnp.take_along_axis(daily_state, jnp.asarray(last_day)[..., None], axis=1)], -1)
    from han_jax.model.heads import MLPHead

    head = MLPHead(hidden=2 * d, hidden2=d, out=cfg.n_regime_classes, dropout=cfg.dropout, policy=Policy())
    want = head.apply({"params": v["params"]["regime_head"]}, want_in, deterministic=True)
    chex.assert_trees_all_close(out["regime_logits"], want, atol=1e-5)
    # The last month's logits move when only the window's last day changes.
    later = inputs.replace(daily_features={n: x.at[:, -1].add(3.0) for n, x in inputs.daily_features.items()})
    moved = model.apply(v, later, deterministic=True)["regime_logits"][:, -1]
    assert float(jnp.max(jnp.abs(moved - out["regime_logits"][:, -1]))) > 1e-4
