"""Stage 3: DailyTemporalEncoder (multi-scale convs, temporal gate, 31-day local causal attention)."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import MultiheadAttention, combine_masks
from han_jax.model.common import (
    Conv1d,
    Linear,
    embed,
    gelu,
    group_norm,
    layer_norm,
    sinusoidal_table,
    unmask_first_if_all_masked,
)
from han_jax.model.dropout import Dropout


def local_window_valid(t: int, window: int, causal: bool = True):
    """[T, T] bool: key j allowed for query i (i-window+1 <= j <= i when causal)."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    if causal:
        return (j <= i) & (j >= i - window + 1)
    return (j >= i - window // 2) & (j <= i + window // 2)


# Each multi-scale convolution has d_model // 4 channels, group-normalised in 4 groups (the original's
# nn.GroupNorm(4, d_model // 4)): d_model // 4 must be a multiple of it.
MULTI_SCALE_GROUPS = 4

class DailyTemporalEncoder(nn.Module, kw_only=True):
    """x [B, T, D], mask [B, T] -> [B, T, D].

    The convolutions are centred (non-causal; k=28 sees t-14..t+13) and for even
    kernels GroupNorm normalises over the T+1 output steps before the trim, as in the
    original. Only the local attention is causal.
    """

    d_model: int
    nhead: int
    dropout: float
    window: int
    max_len: int
    policy: Policy
    kernel_sizes: tuple = (3, 7, 14, 28)
    attention_block: int = 64  # query block of the windowed attention (0: dense)

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        d, pol, det = self.d_model, self.policy, deterministic
        linear = partial(Linear, policy=pol)
        norm = partial(layer_norm, policy=pol)
        table = partial(embed, features=d, policy=pol)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        t = x.shape[1]
        residual = x
        pos = jnp.arange(t)
        p = jax.nn.softmax(self.param("pos_scale", nn.initializers.ones, (4,), pol.param_dtype).astype(jnp.float32))
        dow = table(num_embeddings=7, name="day_of_week_embedding")(pos % 7)
        month = table(num_embeddings=12, name="month_embedding")((pos // 30) % 12)
        xe = p[0] * jnp.asarray(sinusoidal_table(self.max_len, d)[:t]) + p[1] * dow + p[2] * month + p[3] * x
        xe = drop(norm(name="pos_norm")(xe))

        outs = []
        for i, k in enumerate(self.kernel_sizes):
            y = Conv1d(features=d // 4, kernel_size=k, policy=pol, name=f"multi_scale_conv_{i}")(xe)
            # GroupNorm over all T(+1) steps, as the original
            y = group_norm(num_groups=MULTI_SCALE_GROUPS, policy=pol, name=f"multi_scale_norm_{i}")(y)
            outs.append(drop(gelu(y)))
        ms = jnp.concatenate([o[:, :t] for o in outs], axis=-1)
        ms = linear(features=d, name="conv_fusion")(ms)
        ms = drop(gelu(norm(name="conv_fusion_norm")(ms)))

        g = linear(features=d, name="temporal_gate_0")(jnp.concatenate([xe, ms], axis=-1))
        g = drop(gelu(norm(name="temporal_gate_norm")(g)))
        g = jax.nn.sigmoid(linear(features=d, name="temporal_gate_1")(g).astype(jnp.float32))
        gf = g * ms + (1.0 - g) * xe

        valid = combine_masks(unmask_first_if_all_masked(mask), local_window_valid(t, self.window))
        a, _ = MultiheadAttention(
            num_heads=self.nhead, dropout=self.dropout, policy=pol, band=(self.window - 1, 0),
            block_size=self.attention_block, name="local_attention",
        )(gf, gf, gf, valid=valid, deterministic=det)
        a = drop(a)
        a = norm(name="attn_norm")(gf + a)

        og = linear(features=d, name="output_gate")(jnp.concatenate([residual, a], -1))
        og = jax.nn.sigmoid(og.astype(jnp.float32))
        out = norm(name="output_norm")(og * a + (1.0 - og) * residual)
        out = drop(out)
        rs = self.param("residual_scale", nn.initializers.constant(0.1), (), pol.param_dtype).astype(jnp.float32)
        return out + rs * residual
