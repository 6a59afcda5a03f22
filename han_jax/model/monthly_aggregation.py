"""Stage 4: EnhancedLearnableMonthlyAggregation (month queries cross-attend to their days)."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import MultiheadAttention
from han_jax.model.common import Linear, embed, gelu, layer_norm, normal, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout


def month_masks(bnd, day_valid, t: int):
    """Vectorised form of the original's per-(b, m) mask fix-up loop.

    Returns (attn_valid [B, M, T], key_valid [B, T], in_month [B, M, T]). A month whose
    days are all masked gets its start day unmasked in BOTH masks; the key-padding
    change is global to the batch row, exactly as in the original.
    """
    start = bnd[..., 0:1]
    end = bnd[..., 1:2]
    tt = jnp.arange(t)
    in_month = (tt >= start) & (tt < end)  # [B, M, T]
    key_valid = unmask_first_if_all_masked(day_valid)
    need = ~jnp.any(in_month & key_valid[:, None, :], axis=-1, keepdims=True)
    fix = need & (tt == start) & (start < t)
    return in_month | fix, key_valid | jnp.any(fix, axis=1), in_month


class MonthlyAggregation(nn.Module, kw_only=True):
    """daily [B, T, D], boundaries [B, M, 2], day mask [B, T] -> ([B, M, D], agg_mask [B, M], probs).

    The same LayerNorm (norm1) normalises queries and keys; values are un-normed.
    """

    d_model: int
    nhead: int
    max_months: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, daily, bnd, day_valid, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        b, t, _ = daily.shape
        m = bnd.shape[1]
        queries = self.param("month_queries", normal(d**-0.5), (1, self.max_months, d), pol.param_dtype)
        position = embed(num_embeddings=self.max_months, features=d, policy=pol, name="month_position_embedding")
        q = queries[:, :m].astype(jnp.float32) + position(jnp.arange(m))
        q = jnp.broadcast_to(q, (b, m, d))
        attn_valid, key_valid, in_month = month_masks(bnd, day_valid, t)
        valid = (attn_valid & key_valid[:, None, :])[:, None]  # [B, 1, M, T]
        norm1 = layer_norm(policy=pol, name="norm1")
        att, probs = MultiheadAttention(num_heads=self.nhead, dropout=self.dropout, policy=pol, name="cross_attention")(
            norm1(q), norm1(daily), daily, valid=valid, deterministic=det
        )
        a = q + att  # rows without any valid day got zero attention (original: nan_to_num)
        f = linear(features=4 * d, name="ffn_0")(layer_norm(policy=pol, name="norm2")(a))
        f = drop(gelu(f))
        f = drop(linear(features=d, name="ffn_1")(f))
        y = linear(features=d, name="output_projection")(a + f)
        start, end = bnd[..., 0], bnd[..., 1]
        agg_mask = jnp.any(in_month & day_valid[:, None, :], axis=-1) & (start < end) & (start < t) & (end <= t)
        return y, agg_mask, probs
