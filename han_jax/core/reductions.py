"""Masked reductions: the one place where multi-device correctness of every batch statistic is decided.

Every loss and metric of han-jax reduces a batch through these helpers (after
``optax/losses``: the per-element functions stay pure, the reductions are the
caller's). Each takes ``where`` (a mask broadcasting against the values, never
boolean indexing, so shapes stay static under ``jit``) and ``axis_name``: inside
``pmap`` the sums and counts are ``psum``-ed over that axis, so N devices holding
B/N rows each compute the statistics one device holding all B rows would. Under
sharded ``jit`` the step sees the global batch and ``axis_name`` is None.

:class:`Moments` (count, mean, M2) carry a variance that merges exactly across
disjoint sets of rows; they work on jax arrays inside a step and on float64
numpy arrays when a split is accumulated on the host.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def psum(x, axis_name: Optional[str]):
    """``x`` summed over the pmap axis ``axis_name`` (itself when None)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def namespace(*xs):
    """``numpy`` for host values (numpy arrays, Python numbers), ``jax.numpy`` once any is a jax array or tracer.

    Lets one formula serve a jitted step and a float64 host accumulation: ``jax.numpy``
    would silently cast float64 host statistics to f32 (x64 is off by default).
    """
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def masked_sum(x: Array, where: Optional[Array] = None, *, axis=None, axis_name: Optional[str] = None) -> Array:
    """Sum of ``x`` where ``where`` holds, over ``axis`` (all axes by default) and (with ``axis_name``) all devices.

    Unselected elements are replaced by 0 before summing, so a NaN there reaches neither
    the value nor (through ``jnp.where``) the gradient.
    """
    x = jnp.asarray(x, jnp.float32)
    if where is not None:
        x = jnp.where(jnp.broadcast_to(where, x.shape), x, 0.0)
    return psum(jnp.sum(x, axis=axis), axis_name)


def masked_count(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> Array:
    """Number of elements of ``x`` selected by ``where`` (f32), across devices."""
    if where is None:
        n = jnp.float32(math.prod(jnp.shape(x)))
    else:
        n = jnp.sum(jnp.broadcast_to(where, jnp.shape(x)).astype(jnp.float32))
    return psum(n, axis_name)


def sum_and_count(x: Array, where: Optional[Array], *, axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """``(masked_sum, masked_count)``: the two additive statistics behind a masked mean."""
    return masked_sum(x, where, axis_name=axis_name), masked_count(x, where, axis_name=axis_name)


def class_sums(x: Array, where: Array, *, axis_name: Optional[str] = None) -> Array:
    """Per-class sums ``[K]`` of ``x [..., K]`` over the entries ``where`` selects."""
    x = jnp.where(jnp.broadcast_to(where, x.shape), x, 0.0)
    return psum(jnp.sum(x.reshape(-1, x.shape[-1]), axis=0), axis_name)


def ratio(total, count):
    """``total / max(count, 1)``: a masked mean from its sum and count, 0 (not NaN) for an empty selection.

    Works on jax and numpy values alike (a host accumulation keeps float64).
    """
    xp = namespace(total, count)
    return total / xp.maximum(count, 1.0)


def masked_mean(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """Mean of ``x`` over the elements ``where`` selects, and their count.

    ``where`` broadcasts against ``x`` (a row mask ``[B, 1, 1]`` selects whole
    rows). With no element selected the mean is 0 (not NaN) and the count 0,
    so callers can choose a fallback with ``jnp.where`` without NaN gradients.
    """
    total, n = sum_and_count(x, where, axis_name=axis_name)
    return total / jnp.maximum(n, 1.0), n


@flax.struct.dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations about the mean) of a set of values.

    A pytree, so it passes through ``jit``/``pmap``/``vmap``/``device_get``. Two sets'
    Moments merge exactly (:meth:`merge`); the variance needs only these three.

    Attributes:
      count: number of values (f32).
      mean: their mean, 0 when ``count`` is 0.
      m2: ``sum (x - mean)^2``.
    """

    count: Array
    mean: Array
    m2: Array

    def variance(self, ddof: int = 1) -> Array:
        """``m2 / max(count - ddof, 1)``: 0, not torch's NaN, when ``count <= ddof`` (callers test the count)."""
        xp = namespace(self.count, self.m2)
        return self.m2 / xp.maximum(self.count - ddof, 1.0)

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of two disjoint sets (Chan, Golub & LeVeque's parallel formula).

        ``count = na + nb``, ``mean = ma + delta nb / n``, ``m2 = m2a + m2b + delta^2 na nb / n``
        with ``delta = mb - ma``.
        """
        xp = namespace(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        count = self.count + other.count
        # count is 0 only when both sets are empty (means and M2 all 0): dividing by
        # max(count, 1) keeps that case at 0 instead of 0/0.
        frac_other = other.count / xp.maximum(count, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * frac_other
        m2 = self.m2 + other.m2 + delta * delta * self.count * frac_other
        return Moments(count=count, mean=mean, m2=m2)


def masked_moments(x: Array, where: Optional[Array] = None, *, axis_name: Optional[str] = None) -> Moments:
    """:class:`Moments` of the elements of ``x`` that ``where`` selects, across devices.

    Two passes within the batch: the (global) mean first, then the squared deviations
    about it, which is more accurate in f32 than sum-of-squares minus square-of-sum.
    """
    mean, n = masked_mean(x, where, axis_name=axis_name)
    sq = jnp.square(jnp.asarray(x, jnp.float32) - mean)
    return Moments(count=n, mean=mean, m2=masked_sum(sq, where, axis_name=axis_name))


def masked_var(x: Array, where: Optional[Array] = None, *, ddof: int = 1,
               axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """Variance (``ddof=1`` like ``torch.var``) over the selected elements, and their count (0, not NaN, if empty)."""
    moments = masked_moments(x, where, axis_name=axis_name)
    return moments.variance(ddof), moments.count


def merge_statistics(a, b):
    """Statistics of the union of two disjoint sets of rows: arrays add, :class:`Moments` merge.

    Works on jax arrays and on numpy arrays, keeping numpy's dtype (a split is
    accumulated on the host in float64).
    """
    def merge(x, y):
        return x.merge(y) if isinstance(x, Moments) else x + y

    return jax.tree_util.tree_map(merge, a, b, is_leaf=lambda x: isinstance(x, Moments))
