"""``torch.nn.TransformerEncoderLayer(norm_first=True, activation='gelu')`` (pre-norm).

Used by the daily source encoders and the final temporal encoder. ``deterministic``
is a module attribute (not a call argument) so that ``nn.remat`` can wrap the layer
without static argument bookkeeping.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import Band, MultiheadAttention
from han_jax.model.common import Linear, gelu, layer_norm
from han_jax.model.dropout import Dropout


class PreNormEncoderLayer(nn.Module, kw_only=True):
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
        linear = partial(Linear, policy=self.policy, xavier=self.xavier)
        norm = partial(layer_norm, policy=self.policy)

        def drop(y):
            return Dropout(rate=self.dropout)(y, deterministic=det)

        h = norm(name="norm1")(x)
        a, _ = MultiheadAttention(
            num_heads=self.num_heads, dropout=self.dropout, policy=self.policy, xavier_out=self.xavier,
            band=self.band, block_size=self.block_size, name="self_attn",
        )(h, h, h, valid=valid, deterministic=det)
        x = x + drop(a)
        h = norm(name="norm2")(x)
        h = linear(features=self.dim_feedforward, name="linear1")(h)
        h = drop(gelu(h))
        h = linear(features=d, name="linear2")(h)
        return x + drop(h)


def causal_valid(n: int):
    """[n, n] bool, True where key j <= query i."""
    i = jnp.arange(n)
    return i[None, :] <= i[:, None]
