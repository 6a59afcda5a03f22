"""Stage 6: CrossResolutionFusion (daily-aggregate <-> monthly bidirectional cross-attention).

The fusion boundaries of the original are the identity (month m -> days [m, m+1)),
so the TemporalAggregator attends to exactly one key per month: it is computed as a
single-key cross-attention (softmax = 1), which keeps its month_query, query_proj and
key_proj parameters (zero gradient, as in the original). General multi-day windows
are not implemented (the original never uses them here).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import CrossAttention
from han_jax.model.common import Linear, gelu, layer_norm, normal
from han_jax.model.dropout import Dropout


class TemporalAggregator(nn.Module, kw_only=True):
    nhead: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, valid, *, deterministic: bool):
        b, m, d = x.shape
        query = self.param("month_query", normal(1.0), (1, 1, d), self.policy.param_dtype)
        query = jnp.broadcast_to(query, (b * m, 1, d))
        out, _ = CrossAttention(num_heads=self.nhead, dropout=self.dropout, policy=self.policy, name="cross_attn")(
            query, x.reshape(b * m, 1, d), valid.reshape(b * m, 1), deterministic=deterministic
        )
        return out.reshape(b, m, d)


class BidirectionalCrossAttention(nn.Module, kw_only=True):
    nhead: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, a, b, mask_a, mask_b, *, deterministic: bool):
        d = a.shape[-1]
        cross_attention = partial(CrossAttention, num_heads=self.nhead, dropout=self.dropout, policy=self.policy)
        linear = partial(Linear, features=d, policy=self.policy)
        norm = partial(layer_norm, policy=self.policy)
        ca, p_ab = cross_attention(name="cross_attn_a_to_b")(a, b, mask_b, deterministic=deterministic)
        cb, p_ba = cross_attention(name="cross_attn_b_to_a")(b, a, mask_a, deterministic=deterministic)
        ga = jax.nn.sigmoid(linear(name="gate_a")(jnp.concatenate([a, ca], -1)).astype(jnp.float32))
        gb = jax.nn.sigmoid(linear(name="gate_b")(jnp.concatenate([b, cb], -1)).astype(jnp.float32))
        a2 = norm(name="norm_a")(a + ga * ca)
        b2 = norm(name="norm_b")(b + gb * cb)
        return a2, b2, {"a_to_b": p_ab, "b_to_a": p_ba}


class CrossResolutionFusion(nn.Module, kw_only=True):
    """agg [B, M, D], monthly [B, M, D], agg_mask, monthly_mask -> fused monthly [B, M, D].

    The daily branch after the last layer (and ffn_daily / ffn_norm_daily) is computed
    and discarded, as in the original; those parameters get no gradient.
    """

    d_model: int
    nhead: int
    num_layers: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, agg, monthly, agg_mask, monthly_mask, *, deterministic: bool):
        d, det = self.d_model, deterministic
        linear = partial(Linear, policy=self.policy)
        norm = partial(layer_norm, policy=self.policy)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        a = TemporalAggregator(
            nhead=self.nhead // 2, dropout=self.dropout, policy=self.policy, name="daily_aggregator"
        )(agg, agg_mask, deterministic=det)
        b = norm(name="monthly_norm")(linear(features=d, name="monthly_proj")(monthly))
        maps = {}
        for i in range(self.num_layers):
            a, b, maps[f"layer_{i}"] = BidirectionalCrossAttention(
                nhead=self.nhead, dropout=self.dropout, policy=self.policy, name=f"fusion_layers_{i}"
            )(a, b, agg_mask, monthly_mask, deterministic=det)

        def ffn(x, name):
            f = drop(gelu(linear(features=4 * d, name=f"{name}_0")(x)))
            return drop(linear(features=d, name=f"{name}_1")(f))

        _ = norm(name="ffn_norm_daily")(a + ffn(a, "ffn_daily"))  # discarded, as in the original
        b = norm(name="ffn_norm_monthly")(b + ffn(b, "ffn_monthly"))
        return b, maps
