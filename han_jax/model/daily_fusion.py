"""Stage 2: DailyCrossSourceFusion (per-day cross-source attention) and TemporalSourceGate."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.model.attention import MultiheadAttention, combine_masks
from han_jax.model.common import Conv1d, Linear, embed, gelu, layer_norm, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.precision import Policy


class TemporalGatePositionalEncoding(nn.Module):
    """Drop(LN(s0 * pos_emb[t] + s1 * dow_emb[t % 7] + s2 * x)), s = softmax(scale); t = window index."""

    d_model: int
    max_len: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        t = jnp.minimum(jnp.arange(x.shape[1]), self.max_len - 1)
        pos = embed(self.max_len, self.d_model, self.policy, std=0.02, name="position_embedding")(t)
        dow = embed(7, self.d_model, self.policy, std=0.02, name="day_of_week_embedding")(t % 7)
        s = jax.nn.softmax(self.param("scale", nn.initializers.ones, (3,), self.policy.param_dtype).astype(jnp.float32))
        out = layer_norm(self.policy, "layer_norm")(s[0] * pos + s[1] * dow + s[2] * x)
        return Dropout(self.dropout)(out, deterministic=deterministic)


class TemporalSourceGate(nn.Module):
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
        t = x.shape[1]
        n = len(self.kernel_sizes)
        channels = [d // n + (1 if i < d % n else 0) for i in range(n)]
        outs = []
        for i, (k, c) in enumerate(zip(self.kernel_sizes, channels)):
            y = Conv1d(c, k, pol, name=f"multi_scale_convs_{i}")(x)[:, :t]
            outs.append(Dropout(self.dropout)(gelu(y), deterministic=det))
        h = jnp.concatenate(outs, axis=-1)
        h = Linear(d, pol, name="scale_fusion")(h)
        h = Dropout(self.dropout)(gelu(layer_norm(pol, "scale_fusion_norm")(h)), deterministic=det)
        h = TemporalGatePositionalEncoding(d, self.max_len, self.dropout, pol, name="temporal_encoding")(
            h, deterministic=det
        )
        mask = combine_masks(unmask_first_if_all_masked(valid))
        a, _ = MultiheadAttention(self.nhead, self.dropout, pol, name="temporal_attention")(
            h, h, h, valid=mask, deterministic=det
        )
        h = layer_norm(pol, "attn_norm")(h + Dropout(self.dropout)(a, deterministic=det))
        g = Linear(d, pol, name="gate_projection_0")(h)
        g = Dropout(self.dropout)(gelu(layer_norm(pol, "gate_projection_norm")(g)), deterministic=det)
        g = Dropout(self.dropout)(gelu(Linear(d // 2, pol, name="gate_projection_1")(g)), deterministic=det)
        logits = Linear(self.n_sources, pol, name="gate_projection_2")(g).astype(jnp.float32)
        temp = self.param("learnable_temp", nn.initializers.ones, (), pol.param_dtype).astype(jnp.float32)
        return jax.nn.softmax(logits / (jnp.abs(temp) + 0.1), axis=-1)


class DailyCrossSourceFusion(nn.Module):
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
        s = len(hiddens)
        b, t, _ = hiddens[0].shape
        type_emb = embed(s, d, pol, name="source_type_embedding")(jnp.arange(s))  # [S, D]
        z = jnp.stack(hiddens, axis=2) + type_emb  # [B, T, S, D]
        combined = jnp.any(jnp.stack([jnp.any(m, axis=-1) for m in masks], 0), axis=0)
        z = z.reshape(b * t, s, d)
        for i in range(self.num_layers):
            # Post-norm, no mask, no dropout on the attention output (as in the original).
            a, _ = MultiheadAttention(self.nhead, self.dropout, pol, name=f"cross_attention_{i}")(
                z, z, z, deterministic=det
            )
            z = layer_norm(pol, f"layer_norms_{i}")(z + a)
            f = Linear(4 * d, pol, name=f"ffn_{i}_0")(z)
            f = Dropout(self.dropout)(gelu(f), deterministic=det)
            f = Dropout(self.dropout)(Linear(d, pol, name=f"ffn_{i}_1")(f), deterministic=det)
            z = layer_norm(pol, f"ffn_norms_{i}")(z + f)
        z = z.reshape(b, t, s, d)
        w = TemporalSourceGate(d, s, 4, self.dropout, self.max_len, pol, name="source_gate")(
            z.reshape(b, t, s * d), combined, deterministic=det
        )
        y = (z * w[..., None]).reshape(b, t, s * d)
        y = Linear(2 * d, pol, name="output_projection_0")(y)
        y = Dropout(self.dropout)(gelu(layer_norm(pol, "output_projection_norm0")(y)), deterministic=det)
        y = Linear(d, pol, name="output_projection_1")(y)
        return layer_norm(pol, "output_projection_norm1")(y), combined
