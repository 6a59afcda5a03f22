"""Stage 1: DailySourceEncoder, one per daily source (pre-norm causal transformer)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from han_jax.model.attention import combine_masks
from han_jax.model.common import Linear, embed, gelu, layer_norm, normal, sinusoidal_table, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.model.transformer import PreNormEncoderLayer, causal_valid
from han_jax.precision import Policy


def soft_compress(x):
    """|x| > 100 -> +-(100 + log1p(|x|/100 - 1)); the inner value is kept finite everywhere."""
    inner = 100.0 + jnp.log1p(jnp.maximum(jnp.abs(x) / 100.0 - 1.0, 0.0))
    return jnp.where(x > 100, inner, jnp.where(x < -100, -inner, x))


class DailySourceEncoder(nn.Module):
    """x, m: [B, T, F] -> [B, T, D].

    ``feature_embedding`` is created (the original has it) but, as in the original,
    never used: it never receives a gradient. The global ``|h| > 1000`` clamp looks at
    the whole batch, as in the original (so an extreme future value could in principle
    change past outputs; ordinary inputs never reach it).
    """

    n_features: int
    d_model: int
    nhead: int
    num_layers: int
    dropout: float
    causal: bool
    max_len: int
    policy: Policy
    remat: bool = False
    attention_block: int = 64  # query block of the causal attention (0: dense)

    @nn.compact
    def __call__(self, x, m, *, deterministic: bool):
        d, pol = self.d_model, self.policy
        t = x.shape[1]
        x = jnp.where(m, x, 0.0).astype(jnp.float32)
        x = soft_compress(x)
        h = Linear(d, pol, xavier=True, name="feature_projection")(x)
        h = gelu(layer_norm(pol, "feature_norm")(h))
        h = Dropout(self.dropout)(h, deterministic=deterministic)
        h = jnp.where(jnp.any(jnp.abs(h) > 1000), jnp.clip(h, -100, 100), h)

        obs = jnp.any(m, axis=-1)  # [B, T]
        token = self.param("no_observation_token", normal(0.02), (1, 1, d), pol.param_dtype)
        h = jnp.where(obs[..., None], h, token.astype(h.dtype))
        # Unused in the original's forward; kept for a 1:1 parameter mapping.
        self.param("feature_embedding", normal(0.02), (self.n_features, d), pol.param_dtype)
        h = h + embed(2, d, pol, std=0.02, name="observation_status_embedding")(obs.astype(jnp.int32))
        h = h + jnp.asarray(sinusoidal_table(self.max_len, d)[:t])
        h = Dropout(self.dropout)(h, deterministic=deterministic)

        key_valid = unmask_first_if_all_masked(obs)
        valid = combine_masks(key_valid, causal_valid(t) if self.causal else None)
        layer_cls = nn.remat(PreNormEncoderLayer) if self.remat else PreNormEncoderLayer
        for i in range(self.num_layers):
            h = layer_cls(
                self.nhead, 4 * d, self.dropout, pol, deterministic, xavier=True,
                band=(None, 0) if self.causal else None, block_size=self.attention_block, name=f"layers_{i}",
            )(h, valid)
        return layer_norm(pol, "output_norm")(h)
