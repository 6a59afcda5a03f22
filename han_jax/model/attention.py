"""Masked multi-head attention with torch semantics.

One core (:class:`AttentionCore`) serves every attention of the model: scores in
the compute dtype, softmax in f32, bool validity masks (True = may attend),
dropout on the probabilities while training, and ZERO output for a query row
whose keys are all masked (the original's ``nan_to_num``; Flax's default masking
would instead average uniformly over the masked keys). Callers apply torch's
"unmask the first key when every key is masked" rule to key-padding masks
themselves (``common.unmask_first_if_all_masked``), because in the original it is
applied to the padding mask before the causal/window mask is combined with it.

:class:`MultiheadAttention` is ``torch.nn.MultiheadAttention`` (packed in_proj
[D, 3D] with xavier init and zero bias, out_proj with zero bias).
:class:`CrossAttention` is the original's ``MultiHeadCrossAttention`` (separate
q/k/v/o Linears, xavier, zero bias, dropout after the output projection).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.common import Linear, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout, dropout

Band = Tuple[Optional[int], Optional[int]]


class AttentionCore(nn.Module, kw_only=True):
    """softmax(q k^T / sqrt(hd)) v with validity masks; q [B,Q,H,hd], k/v [B,K,H,hd].

    ``valid`` broadcasts to [B, H, Q, K]. Returns (out [B,Q,H,hd], probs [B,H,Q,K]).

    Numerics: logits in the compute dtype, softmax statistics in f32, masked logits
    set to the f32 minimum, and a query row with no valid key gives zero output.
    Dropout acts on the probabilities. The explicit path normalises after the
    value product, ``(dropout(e) @ v) / sum(e)`` with ``e = exp(l - max l)``:
    the same quantity as ``dropout(softmax(l)) @ v`` without a normalised
    [B, H, Q, K] array to write, read and differentiate (one pass fewer each way).

    ``band=(lookback, lookahead)`` is the caller's guarantee that query i has no
    valid key outside ``[i - lookback, i + lookahead]`` (None: unbounded), e.g.
    ``(None, 0)`` for a causal mask and ``(window - 1, 0)`` for a causal window.
    Query rows are then processed in blocks of ``block_size`` against only the keys
    the band allows: at T=365 and blocks of 64 the causal daily encoders do 58% of the dense work, the
    31-day local window 26%, and each block's [B, H, block, keys] arrays stay
    in cache. The mask is still applied inside every block, so the result is the
    dense result; ``tests/test_model_blocks.py`` checks both agree. The explicit path
    moves blocked q, k and v to [B, H, T, hd] once, so that each block's dots batch
    over (B, H) with no transposes of their own (3-6 % of a causal daily encoder layer's
    time on CPU, ``benchmarks/README.md``); unblocked attention keeps the callers'
    layout, because heads first measured 12 % slower for the daily fusion's four keys.

    Dropout draws one key per attention (not per block) and each block takes its window
    of the whole [B, H, Q, K] mask (:func:`~han_jax.model.dropout.dropout`), so blocked and
    dense attention drop the same probabilities, and a block adds no generator call.

    ``fused=True`` sends attention without active dropout (``deterministic`` or rate
    0) through ``jax.nn.dot_product_attention``, times "row has a valid key", with
    ``implementation`` passed on ("cudnn": a fused GPU kernel, which needs bf16 or
    f16). The default is the explicit path in every phase: with ``implementation=None``
    that function takes its XLA path (a normalised softmax written out, then the value
    product), which measured 24 % slower than the explicit path for a daily encoder
    stack in the eval step on CPU (``benchmarks/README.md``). ``probs`` is computed
    densely for callers that return attention maps (after dropout while training, as
    torch returns them); XLA drops it when it is unused.
    """

    dropout: float
    policy: Policy
    fused: bool = False
    implementation: Optional[str] = None
    band: Optional[Band] = None
    block_size: int = 64

    @nn.compact
    def __call__(self, q, k, v, valid: Optional[jax.Array], deterministic: bool) -> Tuple[jax.Array, jax.Array]:
        scale = 1.0 / math.sqrt(q.shape[-1])
        qn, kn = q.shape[1], k.shape[1]
        drop = None
        if not deterministic and self.dropout > 0.0:
            # The whole attention's mask, (key, [B, H, Q, K]); each block drops its window of it.
            drop = (self.make_rng("dropout"), (q.shape[0], q.shape[2], qn, kn))
        fused = self.fused and (deterministic or self.dropout == 0.0)
        if self.band is None or valid is None or self.block_size <= 0 or qn != kn or qn <= self.block_size:
            return self._attend(q, k, v, valid, scale, fused, drop, (0, 0), _TOKENS_FIRST)
        # The explicit path's blocks take their slices heads first, moved once here rather than
        # transposed again by every block's dots; dot_product_attention takes the callers' layout.
        layout = _TOKENS_FIRST if fused else _HEADS_FIRST
        if layout is _HEADS_FIRST:
            q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        tokens = partial(jax.lax.slice_in_dim, axis=layout.tokens)
        lookback, lookahead = self.band
        outs, probs = [], []
        for a in range(0, qn, self.block_size):
            b = min(a + self.block_size, qn)
            lo = 0 if lookback is None else max(0, a - lookback)
            hi = kn if lookahead is None else min(kn, b + lookahead)
            vb = valid[..., a:b, lo:hi] if valid.shape[-2] != 1 else valid[..., lo:hi]
            out, p = self._attend(
                tokens(q, a, b), tokens(k, lo, hi), tokens(v, lo, hi), vb, scale, fused, drop, (a, lo), layout
            )
            outs.append(out)
            probs.append(jnp.pad(p, ((0, 0), (0, 0), (0, 0), (lo, kn - hi))))
        out = jnp.concatenate(outs, axis=layout.tokens)
        return (out if layout is _TOKENS_FIRST else jnp.swapaxes(out, 1, 2)), jnp.concatenate(probs, axis=2)

    def _attend(self, q, k, v, valid, scale, fused, drop, start, layout: "_Layout"):
        """(out, the probabilities that weighted v [B,H,Q,K]) for the block at ``start`` (query, key).

        q, k, v and out are [B, T, H, hd] or, in the explicit path's blocks, [B, H, T, hd] (``layout``).
        """
        cdt = self.policy.compute_dtype
        row_ok = None
        if valid is not None:
            b, qn, kn = q.shape[0], q.shape[layout.tokens], k.shape[layout.tokens]
            valid = jnp.broadcast_to(valid, (b, valid.shape[1], qn, kn))
            row_ok = jnp.any(valid, axis=-1, keepdims=True)  # [B, 1|H, Q, 1]
        if fused:  # always the callers' layout
            out = jax.nn.dot_product_attention(
                q.astype(cdt), k.astype(cdt), v.astype(cdt), mask=valid, scale=scale,
                implementation=self.implementation,
            )
            if row_ok is not None:
                out = out * jnp.swapaxes(row_ok, 1, 2).astype(out.dtype)
            return out, self.probabilities(q, k, valid, scale, layout)
        logits = self._logits(q, k, valid, scale, layout)
        # max is a shift the softmax is invariant to: no gradient (as jax.nn.softmax).
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        inv = 1.0 / jnp.sum(e, axis=-1, keepdims=True)  # [B, H, Q, 1]
        if row_ok is not None:
            # Rows with no valid key: zero output (torch gives NaN, then nan_to_num).
            inv = jnp.where(row_ok, inv, 0.0)
        if drop is not None:
            key, whole = drop
            e = dropout(e, key, self.dropout, within=whole, offsets=(0, 0) + tuple(start))
        out = jnp.einsum(layout.values, e.astype(cdt), v.astype(cdt)).astype(jnp.float32)
        out = out * (inv if layout is _HEADS_FIRST else jnp.swapaxes(inv, 1, 2))
        return out.astype(cdt), e * inv  # the second is dropout(softmax), built only if used

    def _logits(self, q, k, valid, scale, layout: "_Layout"):
        cdt = self.policy.compute_dtype
        q = (q * scale).astype(cdt)
        logits = jnp.einsum(layout.scores, q, k.astype(cdt)).astype(jnp.float32)
        if valid is not None:
            logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        return logits

    def probabilities(self, q, k, valid, scale, layout: "_Layout"):
        probs = jax.nn.softmax(self._logits(q, k, valid, scale, layout), axis=-1)
        if valid is not None:
            probs = jnp.where(jnp.any(valid, axis=-1, keepdims=True), probs, 0.0)
        return probs


class _Layout(NamedTuple):
    """Where the token axis of q, k, v sits, and the two products of attention in that layout."""

    tokens: int
    scores: str  # q, k -> logits [B, H, Q, K]
    values: str  # probabilities, v -> out


# The callers' layout, kept by unblocked and fused attention: the daily fusion's 4-key attention
# at each of B*T days measured 12 % slower transposed heads first.
_TOKENS_FIRST = _Layout(1, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
_HEADS_FIRST = _Layout(2, "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd")


def combine_masks(key_valid: Optional[jax.Array] = None, attn_valid: Optional[jax.Array] = None):
    """Key padding [B, K] and attention mask [Q, K] or [B, Q, K] -> [B, 1, Q, K] (or None)."""
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if attn_valid is not None:
        a = attn_valid[None, None] if attn_valid.ndim == 2 else attn_valid[:, None]
        mask = a if mask is None else (mask & a)
    return mask


class MultiheadAttention(nn.Module, kw_only=True):
    """``torch.nn.MultiheadAttention(batch_first=True)``; returns (out [B,Q,D], probs [B,H,Q,K])."""

    num_heads: int
    dropout: float
    policy: Policy
    xavier_out: bool = False  # the enclosing module re-inits every nn.Linear with xavier
    band: Optional[Band] = None  # see AttentionCore
    block_size: int = 64

    @nn.compact
    def __call__(self, query, key, value, *, valid=None, deterministic: bool):
        d = query.shape[-1]
        h = self.num_heads
        pdt, cdt = self.policy.param_dtype, self.policy.compute_dtype
        w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d), pdt).astype(cdt)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), pdt).astype(cdt)
        if query is key and key is value:  # self-attention: one packed [D, 3D] projection
            q, k, v = jnp.split(query.astype(cdt) @ w + b, 3, axis=-1)
        else:
            q = query.astype(cdt) @ w[:, :d] + b[:d]
            k = key.astype(cdt) @ w[:, d : 2 * d] + b[d : 2 * d]
            v = value.astype(cdt) @ w[:, 2 * d :] + b[2 * d :]
        split = lambda x: x.reshape(x.shape[:-1] + (h, d // h))
        core = AttentionCore(
            dropout=self.dropout, policy=self.policy, band=self.band, block_size=self.block_size, name="core"
        )
        out, probs = core(split(q), split(k), split(v), valid, deterministic)
        out = out.reshape(out.shape[:-2] + (d,))
        out = Linear(features=d, policy=self.policy, xavier=self.xavier_out, zero_bias=True, name="out_proj")(out)
        return out, probs


class CrossAttention(nn.Module, kw_only=True):
    """The original's MultiHeadCrossAttention: key mask [B, K] (True = observed)."""

    num_heads: int
    dropout: float
    policy: Policy

    @nn.compact
    def __call__(self, query, kv, key_valid, *, deterministic: bool):
        d = query.shape[-1]
        h = self.num_heads
        linear = partial(Linear, features=d, policy=self.policy, xavier=True)
        split = lambda x: x.reshape(x.shape[:-1] + (h, d // h))
        q = split(linear(name="query_proj")(query))
        k = split(linear(name="key_proj")(kv))
        v = split(linear(name="value_proj")(kv))
        valid = None
        if key_valid is not None:
            # Here the first-key rule is applied per query row (ScaledDotProductAttention).
            valid = unmask_first_if_all_masked(key_valid)[:, None, None, :]
        out, probs = AttentionCore(dropout=self.dropout, policy=self.policy, name="core")(q, k, v, valid, deterministic)
        out = linear(name="output_proj")(out.reshape(out.shape[:-2] + (d,)))
        out = Dropout(rate=self.dropout)(out, deterministic=deterministic)
        return out, probs
