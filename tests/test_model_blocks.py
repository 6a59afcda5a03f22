"""The model's fast building blocks keep the maths: hashed dropout, the conv kernel gradient."""

from __future__ import annotations

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from han_jax.core.precision import Policy
from han_jax.model.common import Conv1d, conv1d_general_dilated
from han_jax.model.dropout import Dropout, hashed_bits, keep_mask

# ----- dropout -----


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_rate_and_scaling(rate):
    n = 1_000_000
    x = jnp.ones((n,), jnp.float32)
    y = Dropout(rate=rate).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(3)})
    kept = np.asarray(y) != 0
    keep = 1.0 - rate
    # Binomial(n, keep): 5 standard deviations.
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * rate / n)
    np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / keep, rtol=1e-6)
    # Inverted dropout: the mean is preserved.
    assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt(rate / keep / n)


def test_dropout_masks_are_independent():
    shape = (64, 128, 128)
    m = np.asarray(keep_mask(jax.random.PRNGKey(0), 0.5, shape), np.float64)
    flat = m.ravel() - m.mean()
    n = flat.size
    # Neighbours along every axis, and along the flat counter, are uncorrelated.
    for lag in (1, 2, 128, 128 * 128):
        r = np.dot(flat[:-lag], flat[lag:]) / np.dot(flat, flat)
        assert abs(r) < 5 / np.sqrt(n), (lag, r)
    # Each bit of the hash is fair.
    bits = np.asarray(hashed_bits(jnp.array([1, 2], jnp.uint32), (1 << 20,)))
    for b in range(32):
        p = ((bits >> b) & 1).mean()
        assert abs(p - 0.5) < 5 * 0.5 / np.sqrt(bits.size), (b, p)
    # Two draws (two keys) agree as two independent fair coins do: 1/2 of the time.
    m2 = np.asarray(keep_mask(jax.random.PRNGKey(1), 0.5, shape), np.float64)
    assert abs((m == m2).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)
    # Keys differing in one bit, or consecutive split keys, also give unrelated masks.
    for key in (jax.random.PRNGKey(2), jax.random.split(jax.random.PRNGKey(0))[1]):
        m3 = np.asarray(keep_mask(key, 0.5, shape), np.float64)
        assert abs((m == m3).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)


def test_dropout_masks_of_the_train_step_keys_are_independent():
    """The train step's keys (``unsafe_rbg`` from one u32 ``s``, then ``fold_in`` per call site).

    The seed is mixed from the key's words, not drawn from the key: steps one bit apart and
    sites one ``fold_in`` apart must still give unrelated masks.
    """
    shape = (64, 128, 128)
    n = np.prod(shape)
    tol = 5 * 0.5 / np.sqrt(n)
    base = jax.random.key(1, impl="unsafe_rbg")
    m = np.asarray(keep_mask(base, 0.5, shape))
    others = [jax.random.key(2, impl="unsafe_rbg"), jax.random.key(3, impl="unsafe_rbg"),
              jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)]
    masks = [np.asarray(keep_mask(k, 0.5, shape)) for k in others]
    for other in masks:
        assert abs(other.mean() - 0.5) < tol
        assert abs((m == other).mean() - 0.5) < tol
    assert abs((masks[2] == masks[3]).mean() - 0.5) < tol


def test_dropout_draws_no_bits_from_its_key():
    """One generator call per dropout site was most of the train step's compiled instructions."""
    x = jnp.ones((4, 50, 8))
    key = jax.random.key(0, impl="unsafe_rbg")
    jaxpr = jax.make_jaxpr(lambda x, k: Dropout(rate=0.3).apply({}, x, False, rngs={"dropout": k}))(x, key)
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "random_fold_in" in names  # flax's make_rng: the call site folded into the key
    assert "random_bits" not in names, names


def test_dropout_module_contract():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 50, 8))
    drop = Dropout(rate=0.3)
    chex.assert_trees_all_equal(drop.apply({}, x, True), x)
    chex.assert_trees_all_equal(Dropout(rate=0.0).apply({}, x, False), x)
    chex.assert_trees_all_equal(Dropout(rate=1.0).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)}),
                                jnp.zeros_like(x))
    k = {"dropout": jax.random.PRNGKey(7)}
    a = drop.apply({}, x, False, rngs=k)
    chex.assert_trees_all_equal(a, jax.jit(lambda x: drop.apply({}, x, False, rngs=k))(x))  # pure in the key
    assert not np.array_equal(a, drop.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(8)}))
    # Same as flax's Dropout given the same mask: select(mask, x / keep, 0).
    mask = np.asarray(a) != 0
    np.testing.assert_allclose(a, np.where(mask, np.asarray(x) / 0.7, 0.0), rtol=1e-6)
    # The gradient flows through kept elements only, scaled by 1 / keep.
    g = jax.grad(lambda x: drop.apply({}, x, False, rngs=k).sum())(x)
    np.testing.assert_allclose(g, np.where(mask, 1 / 0.7, 0.0), rtol=1e-6)
    with pytest.raises(flax.errors.InvalidRngError):  # training without a dropout rng is an error
        drop.apply({}, x, False)


def test_dropout_bf16_keeps_dtype():
    x = jnp.ones((1000,), jnp.bfloat16)
    y = Dropout(rate=0.1).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert y.dtype == jnp.bfloat16


# ----- Conv1d: the custom kernel gradient equals XLA's -----


def _xla_conv(x, w, k):
    return lax.conv_general_dilated(x, w, (1,), [(k // 2, k // 2)], dimension_numbers=("NWC", "WIO", "NWC"))


@pytest.mark.parametrize("k,c,f", [(3, 5, 4), (14, 12, 6), (28, 8, 2), (1, 3, 3)])
def test_conv1d_matches_xla_forward_and_gradients(k, c, f):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 37, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, c, f)) * 0.3
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NWC", "WIO", "NWC"))
    ours = lambda x, w: conv1d_general_dilated(x, w, (1,), [(k // 2, k // 2)], dimension_numbers=dn)
    ref = lambda x, w: _xla_conv(x, w, k)
    y = ours(x, w)
    chex.assert_shape(y, (3, 37 + (1 if k % 2 == 0 else 0), f))  # torch: even k gives T + 1 steps
    chex.assert_trees_all_close(y, ref(x, w), rtol=1e-6, atol=1e-6)
    cot = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    loss = lambda fn: (lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * cot))
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def test_conv1d_module_keeps_nn_conv_parameters():
    """Same parameter tree and outputs as a plain ``nn.Conv`` with the same init."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 6))
    mod = Conv1d(features=4, kernel_size=7, policy=Policy())
    params = mod.init(jax.random.PRNGKey(1), x)
    chex.assert_shape(params["params"]["conv"]["kernel"], (7, 6, 4))
    chex.assert_shape(params["params"]["conv"]["bias"], (4,))
    plain = nn.Conv(4, (7,), padding=[(3, 3)])
    ref = plain.apply({"params": params["params"]["conv"]}, x)
    chex.assert_trees_all_close(mod.apply(params, x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="stride-1"):
        conv1d_general_dilated(x, params["params"]["conv"]["kernel"], (2,), [(3, 3)],
                               dimension_numbers=lax.conv_dimension_numbers(x.shape, (7, 6, 4), ("NWC", "WIO", "NWC")))


# ----- blockwise (banded) attention equals dense attention -----


def _attention_inputs(t=150, b=2, h=2, hd=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, hd)) for kk in ks[:3])
    obs = jax.random.bernoulli(ks[3], 0.6, (b, t))
    obs = obs.at[0, :40].set(False)  # leading rows with no valid key at all
    return q, k, v, obs


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("band,block", [((None, 0), 32), ((None, 0), 64), ((9, 0), 16), ((30, 0), 64), ((5, 3), 20)])
def test_banded_attention_equals_dense(band, block, fused):
    from han_jax.model.attention import AttentionCore

    q, k, v, obs = _attention_inputs()
    t = q.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    lookback, lookahead = band
    allowed = j <= i + lookahead
    if lookback is not None:
        allowed &= j >= i - lookback
    valid = obs[:, None, None, :] & allowed[None, None]
    # The reference is always the explicit path: a fused result is checked against it too.
    dense = AttentionCore(dropout=0.0, policy=Policy(), fused=False)
    blocked = AttentionCore(dropout=0.0, policy=Policy(), fused=fused, band=band, block_size=block)

    def run(core):
        out, probs = core.apply({}, q, k, v, valid, True)
        grads = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(core.apply({}, q, k, v, valid, True)[0])), (0, 1, 2))(q, k, v)
        return out, probs, grads

    ref, ref_probs, ref_grads = run(dense)
    out, probs, grads = jax.jit(lambda: run(blocked))()
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(probs, ref_probs, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    empty = ~np.asarray(jnp.any(valid, -1))[:, 0]  # [B, Q]: rows with no valid key
    assert empty.sum() >= 30
    assert np.all(np.asarray(out)[empty] == 0.0)  # zero output, as in the dense path


def test_deferred_normalisation_equals_softmax_then_dropout():
    """Training path: dropout(softmax(l)) @ v, with the probabilities it returns."""
    from han_jax.model.attention import AttentionCore

    q, k, v, obs = _attention_inputs(t=40)
    valid = obs[:, None, None, :]
    core = AttentionCore(dropout=0.3, policy=Policy())
    out, probs = core.apply({}, q, k, v, valid, False, rngs={"dropout": jax.random.PRNGKey(5)})
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / 2.0, k)
    soft = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), -1)
    soft = jnp.where(jnp.any(valid, -1, keepdims=True), soft, 0.0)
    kept = np.asarray(probs) != 0
    ref_probs = np.where(kept, soft / 0.7, 0.0)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    assert 0.6 < kept[np.asarray(soft) > 0].mean() < 0.8
    np.testing.assert_allclose(out, jnp.einsum("bhqk,bkhd->bqhd", ref_probs, v), rtol=1e-5, atol=1e-6)


def test_blocked_attention_drops_what_dense_attention_drops():
    """With dropout on, each query block takes its window of the whole attention's mask (one key per
    attention): blocked attention (heads first) and dense attention (the callers' layout) give the same
    training outputs and gradients, and the windows' bits are the whole mask's."""
    from han_jax.model.attention import AttentionCore
    from han_jax.model.dropout import hashed_bits

    q, k, v, obs = _attention_inputs(t=100)
    t = q.shape[1]
    valid = obs[:, None, None, :] & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]
    rngs = {"dropout": jax.random.PRNGKey(7)}
    dense = AttentionCore(dropout=0.3, policy=Policy())
    blocked = AttentionCore(dropout=0.3, policy=Policy(), band=(None, 0), block_size=32)

    def run(core):
        out, probs = core.apply({}, q, k, v, valid, False, rngs=rngs)
        loss = lambda q, k, v: jnp.sum(jnp.sin(core.apply({}, q, k, v, valid, False, rngs=rngs)[0]))
        return out, probs, jax.grad(loss, (0, 1, 2))(q, k, v)

    ref, ref_probs, ref_grads = jax.jit(lambda: run(dense))()
    out, probs, grads = jax.jit(lambda: run(blocked))()
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(probs, ref_probs, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(grads[2]))) > 0.0
    seed = jnp.asarray([3, 11], jnp.uint32)
    whole = hashed_bits(seed, (2, 3, 40, 50))
    window = hashed_bits(seed, (2, 3, 8, 20), within=(2, 3, 40, 50), offsets=(0, 0, 16, 30))
    np.testing.assert_array_equal(window, whole[:, :, 16:24, 30:50])


# ----- the vmapped per-source stacks keep the parameter tree and the outputs -----


@pytest.mark.slow
def test_vmapped_daily_stacks_equal_the_per_source_loop():
    import dataclasses

    from flax.traverse_util import flatten_dict

    from han_jax.config import ModelConfig
    from han_jax.model import MultiResolutionHAN
    from han_jax.testing import random_batch

    cfg = ModelConfig.small(d_model=16, nhead=2)
    inputs, _ = random_batch(cfg, b=2, t=40, m=2, seed=0, n_real=2)
    stacked = MultiResolutionHAN(config=dataclasses.replace(cfg, vmap_sources=True), policy=Policy())
    looped = MultiResolutionHAN(config=dataclasses.replace(cfg, vmap_sources=False), policy=Policy())
    variables = jax.jit(lambda k: stacked.init({"params": k}, inputs, deterministic=True))(jax.random.PRNGKey(0))
    other = jax.eval_shape(lambda k: looped.init({"params": k}, inputs, deterministic=True), jax.random.PRNGKey(0))
    # Same tree, same shapes: checkpoints and the mapping to the original do not depend on it.
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(other)
    chex.assert_trees_all_equal_shapes(variables, other)
    assert ("daily_encoders_personnel", "layers_0", "self_attn", "in_proj_kernel") in flatten_dict(variables["params"])

    det = lambda model: jax.jit(lambda v: model.apply(v, inputs, deterministic=True))(variables)  # noqa: E731
    reference = det(looped)
    chex.assert_trees_all_close(det(stacked), reference, rtol=1e-5, atol=1e-6)

    def train_loss(p):
        out = stacked.apply({"params": p}, inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.sum(out["temporal_output"] ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(train_loss, has_aux=True))(variables["params"])
    chex.assert_tree_all_finite(out)
    assert not np.allclose(out["temporal_output"], reference["temporal_output"])  # dropout acted
    for name in cfg.daily_source_names:
        g = grads[f"daily_encoders_{name}"]["layers_0"]["linear1"]["dense"]["kernel"]
        assert np.abs(np.asarray(g)).max() > 0, name  # every source's stack is trained


def test_gelu_is_torchs_exact_form():
    from math import erf, sqrt

    from han_jax.model.common import gelu

    xs = np.linspace(-12.0, 12.0, 4001)
    ref = np.array([0.5 * x * (1.0 + erf(x / sqrt(2.0))) for x in xs])
    got = np.asarray(jax.jit(gelu)(jnp.asarray(xs, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1.5e-6)
    np.testing.assert_allclose(got, jax.nn.gelu(jnp.asarray(xs, jnp.float32), approximate=False), atol=1.5e-6)
    g = jax.grad(lambda x: gelu(x).sum())(jnp.asarray(xs, jnp.float32))
    phi = np.exp(-xs**2 / 2) / np.sqrt(2 * np.pi)
    cdf = np.array([0.5 * (1.0 + erf(x / sqrt(2.0))) for x in xs])
    np.testing.assert_allclose(g, cdf + xs * phi, atol=2e-6)


@pytest.mark.slow
def test_a_monthly_encoder_padded_to_a_wider_source_gives_its_unpadded_result():
    """MultiSourceMonthlyEncoder runs every source's encoder at the widest source's feature count
    (one vmapped encoder): padding features, marked by feature_valid, must change nothing. Months
    with no observation (the first-key rule) are included."""
    from han_jax.model.monthly_encoder import MonthlyEncoder, _pad_feature_embedding

    enc = dict(d_model=16, nhead=4, num_layers=1, dim_feedforward=32, dropout=0.1, max_months=12, policy=Policy())
    b, m, f, width = 3, 4, 5, 9
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.normal(size=(b, m, f)), jnp.float32)
    tmask = jnp.asarray(rng.random((b, m)) < 0.7).at[0].set(False)
    params = MonthlyEncoder(n_features=f, **enc).init(jax.random.PRNGKey(0), values, tmask,
                                                      deterministic=True)["params"]
    want, _ = MonthlyEncoder(n_features=f, **enc).apply({"params": params}, values, tmask, deterministic=True)
    padded_values = jnp.pad(values, ((0, 0), (0, 0), (0, width - f)), constant_values=7.0)  # never read
    got, _ = MonthlyEncoder(n_features=width, **enc).apply(
        {"params": _pad_feature_embedding(params, width)}, padded_values, tmask, deterministic=True,
        feature_valid=jnp.arange(width) < f)
    chex.assert_shape(got, (b, m, 16))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    unmarked, _ = MonthlyEncoder(n_features=width, **enc).apply(
        {"params": _pad_feature_embedding(params, width)}, padded_values, tmask, deterministic=True)
    assert not np.allclose(np.asarray(unmarked), np.asarray(want), atol=1e-3)  # the mask is what makes it equal
