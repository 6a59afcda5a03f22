"""Stage 8: prediction heads (casualty, regime, anomaly, forecast, daily forecast, uncertainty)."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import MultiheadAttention
from han_jax.model.common import Linear, embed, gelu, layer_norm
from han_jax.model.dropout import Dropout

# The original's daily forecasting head attends over months with 4 heads whatever model.nhead is.
CONTEXT_HEADS = 4


class MLPTrunk(nn.Module, kw_only=True):
    """Linear(h) + LN + GELU + Drop + Linear(h2) + GELU + Drop (the heads' shared layout)."""

    hidden: int
    hidden2: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        linear = partial(Linear, policy=self.policy)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=deterministic)

        h = linear(features=self.hidden, name="linear_0")(x)
        h = drop(gelu(layer_norm(policy=self.policy, name="norm_0")(h)))
        h = linear(features=self.hidden2, name="linear_1")(h)
        return drop(gelu(h))


class CasualtyHead(nn.Module, kw_only=True):
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        h = MLPTrunk(
            hidden=self.hidden, hidden2=self.hidden // 2, dropout=self.dropout, policy=self.policy, name="shared"
        )(x, deterministic=deterministic)
        linear = partial(Linear, features=3, policy=self.policy)
        mean = linear(name="mean_head")(h)
        log_var = linear(name="log_var_head")(h).astype(jnp.float32)
        return mean, jnp.exp(jnp.clip(log_var, -10.0, 10.0))


class MLPHead(nn.Module, kw_only=True):
    """Regime (h2 = h/2), anomaly (h2 = h/2) and forecast (h2 = h) heads."""

    hidden: int
    hidden2: int
    out: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        h = MLPTrunk(hidden=self.hidden, hidden2=self.hidden2, dropout=self.dropout, policy=self.policy, name="trunk")(
            x, deterministic=deterministic
        )
        return Linear(features=self.out, policy=self.policy, name="output")(h)


class LatentStatePredictor(nn.Module, kw_only=True):
    """Last month's latent + horizon embedding -> [B, H, D] future latents (all horizons at once)."""

    d_model: int
    horizon: int
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        pol = self.policy
        linear = partial(Linear, policy=pol)
        c = x[:, -1]
        hemb = embed(num_embeddings=self.horizon, features=self.d_model, policy=pol, name="horizon_embeddings")(
            jnp.arange(self.horizon)
        )
        c = jnp.broadcast_to(c[:, None, :], (c.shape[0], self.horizon, c.shape[-1]))
        inp = jnp.concatenate([c, jnp.broadcast_to(hemb, c.shape).astype(c.dtype)], axis=-1)
        h = linear(features=self.hidden, name="predictor_0")(inp)
        h = gelu(layer_norm(policy=pol, name="predictor_norm")(h))
        h = Dropout(rate=self.dropout)(h, deterministic=deterministic)
        return linear(features=self.d_model, name="predictor_1")(h)


class DailyForecastingHead(nn.Module, kw_only=True):
    """The ``use_latent_forecast=False`` head: MHA4 over months, last step, MLP -> [B, H, F_daily]."""

    horizon: int
    out: int
    hidden: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        a, _ = MultiheadAttention(
            num_heads=CONTEXT_HEADS, dropout=self.dropout, policy=self.policy, name="context_attn"
        )(x, x, x, deterministic=deterministic)
        flat = MLPHead(
            hidden=self.hidden, hidden2=self.hidden, out=self.horizon * self.out, dropout=self.dropout,
            policy=self.policy, name="forecast_net",
        )(a[:, -1], deterministic=deterministic)
        return flat.reshape(x.shape[0], self.horizon, self.out)


class UncertaintyEstimator(nn.Module, kw_only=True):
    hidden: int
    policy: Policy

    @nn.compact
    def __call__(self, x, density):
        linear = partial(Linear, policy=self.policy)
        h = nn.relu(linear(features=self.hidden, name="linear_0")(x))
        u = jax.nn.softplus(linear(features=1, name="linear_1")(h).astype(jnp.float32))
        return u * (1.0 + (1.0 - density))[..., None]
