"""Inverted dropout whose mask comes from a counter-based hash, not a bit generator.

Why not ``flax.linen.Dropout``: on CPU, ``jax.random.bernoulli`` materialises one
u32 per element from the bit generator before the mask is applied. Profiling the
default train step showed the bit generators alone costing more than the attention
matmuls for each attention-dropout mask, with every implementation JAX offers
(threefry2x32, rbg, unsafe_rbg); the figures are in ``benchmarks/README.md``.

Here each element's bits are a hash of (its linear index, a 64-bit seed taken from the
key that the module's ``dropout`` rng stream gives it): a few integer multiplies and
shifts that XLA fuses into the consumer of the mask, so a mask costs about one
elementwise pass and is recomputed rather than stored where XLA prefers.
Fused GPU attention kernels draw their dropout masks the same counter-based way
(FlashAttention uses Philox).

The seed is the key's own words, paired (:func:`key_seed`), not a draw from the key:
flax's ``make_rng`` already folds each call site into the key, and a further
``jax.random.bits`` per site would be one more generator call (RngBitGenerator, which
XLA expands into a called computation of about a hundred instructions) at each of the
default train step's ~360 dropout sites: a fifth of the compiled step, and of its load
from the compilation cache (``benchmarks/README.md``). Pairing the words inside the
mask's own fusion keeps the site's identity a run-time operand, so masks of one shape
still share one compiled kernel.

The maths is flax's (and torch's) dropout: each element is kept independently with
probability ``1 - rate`` and kept elements are scaled by ``1 / (1 - rate)``. The keep
threshold is exact to 2**-32 (flax's uniform-float comparison is exact to 2**-23).
Masks are a pure function of the rng key, so runs and resumed runs stay
bit-reproducible; ``tests/test_model_blocks.py`` checks the keep rate, the scaling, the
independence of neighbouring elements and of successive draws.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_GOLDEN = 0x9E3779B9  # 2**32 / phi: spreads consecutive counters over the word


def _mix32(h: jax.Array) -> jax.Array:
    """Chris Wellons' "lowbias32" integer finaliser (bias ~0.17, below murmur3's fmix32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hashed_bits(seed: jax.Array, shape, *, within=None, offsets=None) -> jax.Array:
    """u32 bits of ``shape`` from a [2] u32 seed: two rounds of lowbias32 over the element index.

    With ``within`` (a larger shape) and ``offsets`` (where ``shape`` starts in it), the
    bits are those of that window of the larger array's: a blocked computation draws, block
    by block, exactly the bits of the whole.
    """
    full = tuple(int(s) for s in (shape if within is None else within))
    size = 1
    for s in full:
        size *= s
    if size >= 2**32:
        raise ValueError(f"dropout mask of {size} elements exceeds the 2**32 hash counter")
    if within is None or tuple(shape) == full:
        counter = lax.iota(jnp.uint32, size).reshape(shape)
    else:
        counter, stride = jnp.uint32(0), 1
        for axis in reversed(range(len(full))):
            position = lax.broadcasted_iota(jnp.uint32, tuple(shape), axis) + jnp.uint32(offsets[axis])
            counter = counter + position * jnp.uint32(stride)
            stride *= full[axis]
    h = _mix32(counter * jnp.uint32(_GOLDEN) + seed[0])
    return _mix32(h ^ seed[1])


def key_seed(key: jax.Array) -> jax.Array:
    """A [2] u32 seed from the words of a PRNG key (typed, or a raw uint32 key).

    Two-word keys (threefry) are the seed. Four-word keys (rbg, ``unsafe_rbg``)
    are folded in pairs, ``[w0 + w1, w2 ^ w3]``, so that both seed words change
    with the step: an ``unsafe_rbg`` key made from one u32 ``s`` is ``[0, s, 0, s]``
    and ``fold_in`` XORs a site's constant into all four words, so a pairing that
    XORs ``w1`` with ``w3`` would cancel ``s``. Two operations, because they are
    fused into every mask element's computation (chaining the words through the
    hash as well added 20,000 instructions to the train step).
    """
    words = jax.random.key_data(key)
    n = words.shape[-1]
    if n == 2:
        return words
    if n != 4:
        raise ValueError(f"dropout key has {n} u32 words; expected 2 (threefry) or 4 (rbg, unsafe_rbg)")
    return jnp.stack([words[..., 0] + words[..., 1], words[..., 2] ^ words[..., 3]], axis=-1)


def keep_mask(key: jax.Array, keep_prob: float, shape, *, within=None, offsets=None) -> jax.Array:
    """Bool mask of ``shape``, each element True with probability ``keep_prob`` (a window: see :func:`hashed_bits`)."""
    threshold = min(int(round(keep_prob * 2**32)), 2**32 - 1)
    return hashed_bits(key_seed(key), shape, within=within, offsets=offsets) < jnp.uint32(threshold)


def dropout(x: jax.Array, key: jax.Array, rate: float, *, within=None, offsets=None) -> jax.Array:
    """Inverted dropout of ``x`` with the mask of ``key`` (of the window ``offsets`` of an array ``within``)."""
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep_prob = 1.0 - rate
    mask = keep_mask(key, keep_prob, x.shape, within=within, offsets=offsets)
    return lax.select(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module, kw_only=True):
    """Drop-in for ``flax.linen.Dropout(rate)(x, deterministic=...)`` with hashed masks."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return inputs
        return dropout(inputs, self.make_rng(self.rng_collection), self.rate)
