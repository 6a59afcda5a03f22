"""``torch.nn.TransformerEncoderLayer(norm_first=True, activation='gelu')`` (pre-norm).

Used by the daily source encoders and the final temporal encoder. ``deterministic``
is a module attribute (not a call argument) so that ``nn.remat`` can wrap the layer
without static argument bookkeeping.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from han_jax.model.attention import Band, MultiheadAttention
from han_jax.model.common import Linear, gelu, layer_norm
from han_jax.model.dropout import Dropout
from han_jax.precision import Policy


class PreNormEncoderLayer(nn.Module):
    num_heads: int
    dim_feedforward: int
    dropout: float
    policy: Policy
    deterministic: bool
    xavier: bool = False  # DailySourceEncoder re-inits its Linears (not the in_proj) with xavier
    band: Optional[Band] = None  # (None, 0) when the mask is causal: blockwise attention (AttentionCore)
    block_size: int = 64

    @nn.compact
    def __call__(self, x, valid):
        det = self.deterministic
        d = x.shape[-1]
        h = layer_norm(self.policy, "norm1")(x)
        a, _ = MultiheadAttention(
            self.num_heads, self.dropout, self.policy, xavier_out=self.xavier, band=self.band,
            block_size=self.block_size, name="self_attn",
        )(h, h, h, valid=valid, deterministic=det)
        x = x + Dropout(self.dropout)(a, deterministic=det)
        h = layer_norm(self.policy, "norm2")(x)
        h = Linear(self.dim_feedforward, self.policy, xavier=self.xavier, name="linear1")(h)
        h = Dropout(self.dropout)(gelu(h), deterministic=det)
        h = Linear(d, self.policy, xavier=self.xavier, name="linear2")(h)
        return x + Dropout(self.dropout)(h, deterministic=det)


def causal_valid(n: int):
    """[n, n] bool, True where key j <= query i."""
    i = jnp.arange(n)
    return i[None, :] <= i[:, None]
