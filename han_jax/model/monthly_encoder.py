"""Stage 5: MonthlyEncoder (one per monthly source) and MultiSourceMonthlyEncoder."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import MultiheadAttention
from han_jax.model.common import Linear, embed, gelu, layer_norm, normal, sinusoidal_table, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.model.stacking import declare_params, stack_trees


class ObservationMaskedLayer(nn.Module, kw_only=True):
    """Post-norm, non-causal transformer layer with key padding from the month mask."""

    nhead: int
    dim_feedforward: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, tmask, *, deterministic: bool):
        pol, det, d = self.policy, deterministic, x.shape[-1]
        linear = partial(Linear, policy=pol, xavier=True)
        norm = partial(layer_norm, policy=pol)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        valid = unmask_first_if_all_masked(tmask)[:, None, None, :]
        a, _ = MultiheadAttention(
            num_heads=self.nhead, dropout=self.dropout, policy=pol, xavier_out=True, name="self_attn"
        )(x, x, x, valid=valid, deterministic=det)
        x = norm(name="norm1")(x + drop(a))
        f = linear(features=self.dim_feedforward, name="ffn_0")(x)
        f = drop(gelu(f))
        f = drop(linear(features=d, name="ffn_1")(f))
        return norm(name="norm2")(x + f)


class MonthlyEncoder(nn.Module, kw_only=True):
    """values [B, M, F], month mask [B, M] (bool) -> [B, M, D].

    Every Linear is xavier/zero-bias and every table N(0, 0.02), as in the original.
    ``feature_valid`` [F] (bool) marks padding features (False), which no month
    observes and the feature attention never attends to: with it the encoders of
    sources with fewer features run padded to a common width
    (:class:`MultiSourceMonthlyEncoder`) and give the unpadded result.
    The ``uncertainty_head`` is built and evaluated (its output is unused by the HAN,
    as in the original, so XLA drops it); its parameters never receive a gradient.
    """

    n_features: int
    d_model: int
    nhead: int
    num_layers: int
    dim_feedforward: int
    dropout: float
    max_months: int
    policy: Policy

    @nn.compact
    def __call__(self, values, tmask, *, deterministic: bool, feature_valid=None):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol, xavier=True)
        norm = partial(layer_norm, policy=pol)
        table = partial(embed, features=d, policy=pol, std=0.02)
        b, m, f = values.shape
        fm = jnp.broadcast_to(tmask[..., None], (b, m, f))
        if feature_valid is not None:
            fm = fm & feature_valid
        v = jnp.where(fm, values, 0.0).astype(jnp.float32)
        e = linear(features=d, name="feature_projection")(v[..., None])  # [B, M, F, D]
        token = self.param("no_observation_token", normal(0.02), (1, 1, d), pol.param_dtype)
        e = jnp.where(fm[..., None], e, token.astype(e.dtype))
        month_idx = jnp.arange(m)
        e = (
            e
            + table(num_embeddings=f, name="feature_embedding")(jnp.arange(f))
            + table(num_embeddings=2, name="observation_status_embedding")(fm.astype(jnp.int32))
            + (
                table(num_embeddings=self.max_months, name="temporal_embedding")(month_idx)
                + jnp.asarray(sinusoidal_table(self.max_months, d))[month_idx]
            )[None, :, None, :]
        )
        flat = e.reshape(b * m, f, d)
        fvalid = unmask_first_if_all_masked(fm.reshape(b * m, f))[:, None, None, :]
        cls = self.param("cls_token", normal(0.02), (1, 1, d), pol.param_dtype)
        cls = jnp.broadcast_to(cls, (b * m, 1, d))
        pooled, _ = MultiheadAttention(
            num_heads=self.nhead, dropout=self.dropout, policy=pol, xavier_out=True, name="feature_attention"
        )(cls, flat, flat, valid=fvalid, deterministic=det)
        h = norm(name="feature_norm")(pooled.reshape(b, m, d))  # no residual (as in the original)
        for i in range(self.num_layers):
            h = ObservationMaskedLayer(
                nhead=self.nhead, dim_feedforward=self.dim_feedforward, dropout=self.dropout, policy=pol,
                name=f"encoder_layers_{i}",
            )(h, tmask, deterministic=det)
        h = linear(features=d, name="output_projection")(h)
        h = Dropout(rate=self.dropout)(gelu(norm(name="output_norm")(h)), deterministic=det)
        # Unused by the HAN (as in the original): kept for the parameter mapping.
        u = nn.relu(linear(features=d // 2, name="uncertainty_head_0")(h))
        u = nn.softplus(linear(features=1, name="uncertainty_head_1")(u))
        return h, u


def _pad_feature_embedding(params, width: int):
    """A MonthlyEncoder's parameters with ``feature_embedding`` zero-padded to ``width`` rows."""
    table = params["feature_embedding"]["embedding"]
    table = jnp.pad(table, ((0, width - table.shape[0]), (0, 0)))
    return {**params, "feature_embedding": {"embedding": table}}


class MultiSourceMonthlyEncoder(nn.Module, kw_only=True):
    """Per-source monthly encoders (run as one, vmapped) + post-norm cross-source attention (no FFN)."""

    n_features: tuple
    d_model: int
    nhead: int
    num_layers: int
    num_fusion_layers: int
    dim_feedforward: int
    dropout: float
    max_months: int
    policy: Policy

    @nn.compact
    def __call__(self, values, tmasks, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol)
        norm = partial(layer_norm, policy=pol)
        s = len(values)
        type_emb = embed(num_embeddings=s, features=d, policy=pol, name="source_type_embedding")(jnp.arange(s))
        # The sources' encoders differ only in their feature count: declare each one's
        # parameters under its own name (the original's tree), pad the feature axis to the
        # widest source and run them as one encoder vmapped over sources. Unrolled, the five
        # encoders were 2,039 of the default train step's 12,796 compiled ops.
        widths = self.n_features
        width = max(widths)
        encoder = partial(MonthlyEncoder, d_model=d, nhead=self.nhead, num_layers=self.num_layers,
                          dim_feedforward=self.dim_feedforward, dropout=self.dropout, max_months=self.max_months,
                          policy=pol, parent=None)
        params = [
            declare_params(self, f"source_encoders_{i}", encoder(n_features=f), jnp.zeros((1, 1, f)),
                           jnp.ones((1, 1), bool), deterministic=True)
            for i, f in enumerate(widths)
        ]
        padded = [_pad_feature_embedding(p, width) for p in params]
        args = [
            stack_trees(padded),
            jnp.stack([jnp.pad(v, ((0, 0), (0, 0), (0, width - f))) for v, f in zip(values, widths)]),
            jnp.stack(tmasks),
            jnp.asarray([[j < f for j in range(width)] for f in widths]),
        ]

        def run(p, v, tm, feature_valid, key=None):
            h, _ = encoder(n_features=width).apply(
                {"params": p}, v, tm, deterministic=det, feature_valid=feature_valid,
                rngs=None if key is None else {"dropout": key})
            return h

        if not det:
            args.append(jax.random.split(self.make_rng("dropout"), s))
        stacked = jax.vmap(run)(*args)  # [S, B, M, D]
        hs = [stacked[i] + type_emb[i] for i in range(s)]
        b, m, _ = hs[0].shape
        z = jnp.stack(hs, axis=2).reshape(b * m, s, d)
        for i in range(self.num_fusion_layers):
            a, _ = MultiheadAttention(
                num_heads=self.nhead, dropout=self.dropout, policy=pol, name=f"cross_source_attention_{i}"
            )(z, z, z, deterministic=det)
            z = norm(name=f"cross_source_norms_{i}")(z + a)
        concat = z.reshape(b, m, s * d)
        imp = nn.relu(linear(features=d, name="source_importance_0")(concat))
        imp = jax.nn.softmax(linear(features=s, name="source_importance_1")(imp).astype(jnp.float32), axis=-1)
        h = linear(features=2 * d, name="output_projection_0")(concat)
        h = Dropout(rate=self.dropout)(gelu(norm(name="output_projection_norm0")(h)), deterministic=det)
        h = norm(name="output_projection_norm1")(linear(features=d, name="output_projection_1")(h))
        return h, imp
