"""Stage 2: DailyCrossSourceFusion (per-day cross-source attention) and TemporalSourceGate."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import MultiheadAttention, combine_masks
from han_jax.model.common import Conv1d, Linear, embed, gelu, layer_norm, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout


class TemporalGatePositionalEncoding(nn.Module, kw_only=True):
    """Drop(LN(s0 * pos_emb[t] + s1 * dow_emb[t % 7] + s2 * x)), s = softmax(scale); t = window index."""

    d_model: int
    max_len: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        t = jnp.minimum(jnp.arange(x.shape[1]), self.max_len - 1)
        table = partial(embed, features=self.d_model, policy=self.policy, std=0.02)
        pos = table(num_embeddings=self.max_len, name="position_embedding")(t)
        dow = table(num_embeddings=7, name="day_of_week_embedding")(t % 7)
        s = jax.nn.softmax(self.param("scale", nn.initializers.ones, (3,), self.policy.param_dtype).astype(jnp.float32))
        out = layer_norm(policy=self.policy, name="layer_norm")(s[0] * pos + s[1] * dow + s[2] * x)
        return Dropout(rate=self.dropout)(out, deterministic=deterministic)


class TemporalSourceGate(nn.Module, kw_only=True):
    """[B, T, S*D] -> source weights [B, T, S] (sum to 1 per day).

    The convolutions are centred (non-causal); the k=14 branch yields T+1 steps and
    is trimmed to the first T, as in the original.
    """

    d_model: int
    n_sources: int
    nhead: int
    dropout: float
    max_len: int
    policy: Policy
    kernel_sizes: Sequence[int] = (3, 7, 14)

    @nn.compact
    def __call__(self, x, valid, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol)
        norm = partial(layer_norm, policy=pol)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        t = x.shape[1]
        n = len(self.kernel_sizes)
        channels = [d // n + (1 if i < d % n else 0) for i in range(n)]
        outs = []
        for i, (k, c) in enumerate(zip(self.kernel_sizes, channels)):
            y = Conv1d(features=c, kernel_size=k, policy=pol, name=f"multi_scale_convs_{i}")(x)[:, :t]
            outs.append(drop(gelu(y)))
        h = jnp.concatenate(outs, axis=-1)
        h = linear(features=d, name="scale_fusion")(h)
        h = drop(gelu(norm(name="scale_fusion_norm")(h)))
        h = TemporalGatePositionalEncoding(
            d_model=d, max_len=self.max_len, dropout=self.dropout, policy=pol, name="temporal_encoding"
        )(h, deterministic=det)
        mask = combine_masks(unmask_first_if_all_masked(valid))
        a, _ = MultiheadAttention(num_heads=self.nhead, dropout=self.dropout, policy=pol, name="temporal_attention")(
            h, h, h, valid=mask, deterministic=det
        )
        h = norm(name="attn_norm")(h + drop(a))
        g = linear(features=d, name="gate_projection_0")(h)
        g = drop(gelu(norm(name="gate_projection_norm")(g)))
        g = drop(gelu(linear(features=d // 2, name="gate_projection_1")(g)))
        logits = linear(features=self.n_sources, name="gate_projection_2")(g).astype(jnp.float32)
        temp = self.param("learnable_temp", nn.initializers.ones, (), pol.param_dtype).astype(jnp.float32)
        return jax.nn.softmax(logits / (jnp.abs(temp) + 0.1), axis=-1)


class DailyCrossSourceFusion(nn.Module, kw_only=True):
    """Per-source [B, T, D] hiddens + [B, T, F] masks -> fused [B, T, D], combined mask [B, T]."""

    d_model: int
    nhead: int
    num_layers: int
    dropout: float
    max_len: int
    policy: Policy

    @nn.compact
    def __call__(self, hiddens, masks, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol)
        norm = partial(layer_norm, policy=pol)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        s = len(hiddens)
        b, t, _ = hiddens[0].shape
        source_type = embed(num_embeddings=s, features=d, policy=pol, name="source_type_embedding")
        z = jnp.stack(hiddens, axis=2) + source_type(jnp.arange(s))  # [B, T, S, D]
        combined = jnp.any(jnp.stack([jnp.any(m, axis=-1) for m in masks], 0), axis=0)
        z = z.reshape(b * t, s, d)
        for i in range(self.num_layers):
            # Post-norm, no mask, no dropout on the attention output (as in the original).
            a, _ = MultiheadAttention(
                num_heads=self.nhead, dropout=self.dropout, policy=pol, name=f"cross_attention_{i}"
            )(z, z, z, deterministic=det)
            z = norm(name=f"layer_norms_{i}")(z + a)
            f = linear(features=4 * d, name=f"ffn_{i}_0")(z)
            f = drop(gelu(f))
            f = drop(linear(features=d, name=f"ffn_{i}_1")(f))
            z = norm(name=f"ffn_norms_{i}")(z + f)
        z = z.reshape(b, t, s, d)
        w = TemporalSourceGate(
            d_model=d, n_sources=s, nhead=4, dropout=self.dropout, max_len=self.max_len, policy=pol, name="source_gate"
        )(z.reshape(b, t, s * d), combined, deterministic=det)
        y = (z * w[..., None]).reshape(b, t, s * d)
        y = linear(features=2 * d, name="output_projection_0")(y)
        y = drop(gelu(norm(name="output_projection_norm0")(y)))
        y = linear(features=d, name="output_projection_1")(y)
        return norm(name="output_projection_norm1")(y), combined
