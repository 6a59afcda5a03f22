"""Stage 8: prediction heads (casualty, regime, anomaly, forecast, daily forecast, uncertainty)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.model.attention import MultiheadAttention
from han_jax.model.common import Linear, embed, gelu, layer_norm
from han_jax.model.dropout import Dropout
from han_jax.precision import Policy


class MLPTrunk(nn.Module):
    """Linear(h) + LN + GELU + Drop + Linear(h2) + GELU + Drop (the heads' shared layout)."""

    hidden: int
    hidden2: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        pol, det = self.policy, deterministic
        h = Linear(self.hidden, pol, name="linear_0")(x)
        h = Dropout(self.dropout)(gelu(layer_norm(pol, "norm_0")(h)), deterministic=det)
        h = Linear(self.hidden2, pol, name="linear_1")(h)
        return Dropout(self.dropout)(gelu(h), deterministic=det)


class CasualtyHead(nn.Module):
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        h = MLPTrunk(self.hidden, self.hidden // 2, self.dropout, self.policy, name="shared")(x, deterministic=deterministic)
        mean = Linear(3, self.policy, name="mean_head")(h)
        log_var = Linear(3, self.policy, name="log_var_head")(h).astype(jnp.float32)
        return mean, jnp.exp(jnp.clip(log_var, -10.0, 10.0))


class MLPHead(nn.Module):
    """Regime (h2 = h/2), anomaly (h2 = h/2) and forecast (h2 = h) heads."""

    hidden: int
    hidden2: int
    out: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        h = MLPTrunk(self.hidden, self.hidden2, self.dropout, self.policy, name="trunk")(x, deterministic=deterministic)
        return Linear(self.out, self.policy, name="output")(h)


class LatentStatePredictor(nn.Module):
    """Last month's latent + horizon embedding -> [B, H, D] future latents (all horizons at once)."""

    d_model: int
    horizon: int
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        pol = self.policy
        c = x[:, -1]
        hemb = embed(self.horizon, self.d_model, pol, name="horizon_embeddings")(jnp.arange(self.horizon))
        c = jnp.broadcast_to(c[:, None, :], (c.shape[0], self.horizon, c.shape[-1]))
        inp = jnp.concatenate([c, jnp.broadcast_to(hemb, c.shape).astype(c.dtype)], axis=-1)
        h = Linear(self.hidden, pol, name="predictor_0")(inp)
        h = Dropout(self.dropout)(gelu(layer_norm(pol, "predictor_norm")(h)), deterministic=deterministic)
        return Linear(self.d_model, pol, name="predictor_1")(h)


class DailyForecastingHead(nn.Module):
    """The ``use_latent_forecast=False`` head: MHA4 over months, last step, MLP -> [B, H, F_daily]."""

    horizon: int
    out: int
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        a, _ = MultiheadAttention(4, self.dropout, self.policy, name="context_attn")(x, x, x, deterministic=deterministic)
        flat = MLPHead(self.hidden, self.hidden, self.horizon * self.out, self.dropout, self.policy, name="forecast_net")(
            a[:, -1], deterministic=deterministic
        )
        return flat.reshape(x.shape[0], self.horizon, self.out)


class UncertaintyEstimator(nn.Module):
    hidden: int
    policy: Policy

    @nn.compact
    def __call__(self, x, density):
        h = nn.relu(Linear(self.hidden, self.policy, name="linear_0")(x))
        u = jax.nn.softplus(Linear(1, self.policy, name="linear_1")(h).astype(jnp.float32))
        return u * (1.0 + (1.0 - density))[..., None]
