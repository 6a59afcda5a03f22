"""Stage 5: MonthlyEncoder (one per monthly source) and MultiSourceMonthlyEncoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.model.attention import MultiheadAttention
from han_jax.model.common import Linear, embed, gelu, layer_norm, normal, sinusoidal_table, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.precision import Policy


class ObservationMaskedLayer(nn.Module):
    """Post-norm, non-causal transformer layer with key padding from the month mask."""

    nhead: int
    dim_feedforward: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, tmask, *, deterministic: bool):
        pol, det, d = self.policy, deterministic, x.shape[-1]
        valid = unmask_first_if_all_masked(tmask)[:, None, None, :]
        a, _ = MultiheadAttention(self.nhead, self.dropout, pol, xavier_out=True, name="self_attn")(
            x, x, x, valid=valid, deterministic=det
        )
        x = layer_norm(pol, "norm1")(x + Dropout(self.dropout)(a, deterministic=det))
        f = Linear(self.dim_feedforward, pol, xavier=True, name="ffn_0")(x)
        f = Dropout(self.dropout)(gelu(f), deterministic=det)
        f = Dropout(self.dropout)(Linear(d, pol, xavier=True, name="ffn_1")(f), deterministic=det)
        return layer_norm(pol, "norm2")(x + f)


class MonthlyEncoder(nn.Module):
    """values [B, M, F], month mask [B, M] (bool) -> [B, M, D].

    Every Linear is xavier/zero-bias and every table N(0, 0.02), as in the original.
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
    def __call__(self, values, tmask, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        b, m, f = values.shape
        fm = jnp.broadcast_to(tmask[..., None], (b, m, f))
        v = jnp.where(fm, values, 0.0).astype(jnp.float32)
        e = Linear(d, pol, xavier=True, name="feature_projection")(v[..., None])  # [B, M, F, D]
        token = self.param("no_observation_token", normal(0.02), (1, 1, d), pol.param_dtype)
        e = jnp.where(fm[..., None], e, token.astype(e.dtype))
        month_idx = jnp.arange(m)
        e = (
            e
            + embed(f, d, pol, std=0.02, name="feature_embedding")(jnp.arange(f))
            + embed(2, d, pol, std=0.02, name="observation_status_embedding")(fm.astype(jnp.int32))
            + (
                embed(self.max_months, d, pol, std=0.02, name="temporal_embedding")(month_idx)
                + jnp.asarray(sinusoidal_table(self.max_months, d))[month_idx]
            )[None, :, None, :]
        )
        flat = e.reshape(b * m, f, d)
        fvalid = unmask_first_if_all_masked(fm.reshape(b * m, f))[:, None, None, :]
        cls = self.param("cls_token", normal(0.02), (1, 1, d), pol.param_dtype)
        cls = jnp.broadcast_to(cls, (b * m, 1, d))
        pooled, _ = MultiheadAttention(self.nhead, self.dropout, pol, xavier_out=True, name="feature_attention")(
            cls, flat, flat, valid=fvalid, deterministic=det
        )
        h = layer_norm(pol, "feature_norm")(pooled.reshape(b, m, d))  # no residual (as in the original)
        for i in range(self.num_layers):
            h = ObservationMaskedLayer(self.nhead, self.dim_feedforward, self.dropout, pol, name=f"encoder_layers_{i}")(
                h, tmask, deterministic=det
            )
        h = Linear(d, pol, xavier=True, name="output_projection")(h)
        h = Dropout(self.dropout)(gelu(layer_norm(pol, "output_norm")(h)), deterministic=det)
        # Unused by the HAN (as in the original): kept for the parameter mapping.
        u = nn.relu(Linear(d // 2, pol, xavier=True, name="uncertainty_head_0")(h))
        u = nn.softplus(Linear(1, pol, xavier=True, name="uncertainty_head_1")(u))
        return h, u


class MultiSourceMonthlyEncoder(nn.Module):
    """Per-source monthly encoders + post-norm cross-source attention (attention only, no FFN)."""

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
        s = len(values)
        type_emb = embed(s, d, pol, name="source_type_embedding")(jnp.arange(s))
        hs = []
        for i, (v, tm) in enumerate(zip(values, tmasks)):
            h, _ = MonthlyEncoder(
                self.n_features[i], d, self.nhead, self.num_layers, self.dim_feedforward, self.dropout,
                self.max_months, pol, name=f"source_encoders_{i}",
            )(v, tm, deterministic=det)
            hs.append(h + type_emb[i])
        b, m, _ = hs[0].shape
        z = jnp.stack(hs, axis=2).reshape(b * m, s, d)
        for i in range(self.num_fusion_layers):
            a, _ = MultiheadAttention(self.nhead, self.dropout, pol, name=f"cross_source_attention_{i}")(
                z, z, z, deterministic=det
            )
            z = layer_norm(pol, f"cross_source_norms_{i}")(z + a)
        concat = z.reshape(b, m, s * d)
        imp = nn.relu(Linear(d, pol, name="source_importance_0")(concat))
        imp = jax.nn.softmax(Linear(s, pol, name="source_importance_1")(imp).astype(jnp.float32), axis=-1)
        h = Linear(2 * d, pol, name="output_projection_0")(concat)
        h = Dropout(self.dropout)(gelu(layer_norm(pol, "output_projection_norm0")(h)), deterministic=det)
        h = layer_norm(pol, "output_projection_norm1")(Linear(d, pol, name="output_projection_1")(h))
        return h, imp
