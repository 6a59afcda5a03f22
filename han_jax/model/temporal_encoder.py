"""Stage 7: TemporalEncoder (pre-norm causal transformer over months)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import combine_masks
from han_jax.model.common import layer_norm, sinusoidal_table, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.model.transformer import PreNormEncoderLayer, causal_valid


class TemporalEncoder(nn.Module, kw_only=True):
    d_model: int
    nhead: int
    num_layers: int
    dropout: float
    causal: bool
    max_len: int
    policy: Policy

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        m = x.shape[1]
        h = x + jnp.asarray(sinusoidal_table(self.max_len, self.d_model)[:m])
        h = Dropout(rate=self.dropout)(h, deterministic=deterministic)
        valid = combine_masks(unmask_first_if_all_masked(mask), causal_valid(m) if self.causal else None)
        for i in range(self.num_layers):
            h = PreNormEncoderLayer(
                num_heads=self.nhead, dim_feedforward=4 * self.d_model, dropout=self.dropout, policy=self.policy,
                deterministic=deterministic, band=(None, 0) if self.causal else None, name=f"layers_{i}",
            )(h, valid)
        return layer_norm(policy=self.policy, name="output_norm")(h)
