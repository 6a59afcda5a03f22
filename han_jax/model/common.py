"""Shared building blocks with torch semantics: Linear/Conv1d inits, norms, GELU, tables.

Initialisers follow the original: torch's default ``Linear``/``Conv1d`` init is
U(+-1/sqrt(fan_in)) for weight and bias; modules that the original re-initialises
use xavier-uniform weights with zero bias.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from han_jax.core.precision import Policy

LN_EPS = 1e-5


def torch_uniform(fan_in: int):
    """torch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def gelu(x):
    """torch's ``nn.GELU()``: the exact form ``0.5 * x * (1 + erf(x / sqrt(2)))``.

    Written as torch writes it rather than as ``jax.nn.gelu(approximate=False)``
    (flax's default is the tanh approximation), whose ``erfc`` lowering is slower
    on CPU (figures in ``benchmarks/README.md``); the two differ by at most
    1.3e-6 absolutely, in the far negative tail where torch's form loses the same
    digits.
    """
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class Linear(nn.Module, kw_only=True):
    """``torch.nn.Linear`` with its default init, or xavier/zero-bias when ``xavier``."""

    features: int
    policy: Policy
    xavier: bool = False
    zero_bias: bool = False  # torch MHA's out_proj: default weight init, zero bias
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        if self.xavier:
            k_init, b_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
        else:
            k_init, b_init = torch_uniform(fan_in), torch_uniform(fan_in)
        if self.zero_bias:
            b_init = nn.initializers.zeros
        return nn.Dense(
            features=self.features,
            use_bias=self.use_bias,
            kernel_init=k_init,
            bias_init=b_init,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            name="dense",
        )(x)


def _conv(x, w, padding, dimension_numbers, precision):
    return lax.conv_general_dilated(x, w, (1,), padding, dimension_numbers=dimension_numbers, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv1d(x, w, padding, dimension_numbers, precision):
    return _conv(x, w, padding, dimension_numbers, precision)


def _conv1d_fwd(x, w, padding, dimension_numbers, precision):
    return _conv(x, w, padding, dimension_numbers, precision), (x, w)


def _conv1d_bwd(padding, dimension_numbers, precision, res, dy):
    x, w = res
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, padding, dimension_numbers, precision), x)
    (dx,) = vjp_x(dy)
    # XLA:CPU lowers the kernel gradient to a convolution whose window is the whole
    # sequence, which dominated the source gate's backward pass (benchmarks/README.md).
    # The same sum as one matmul: dW[j, c, f] = sum_{b,s} xp[b, s, c] * dy[b, s - j, f],
    # with dy shifted k times (k*F columns, small) instead of x (k*C columns).
    (lo, hi), = padding
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)))
    extra = xp.shape[1] - dy.shape[1]  # = k - 1
    dy_shifted = jnp.stack([jnp.pad(dy, ((0, 0), (j, extra - j), (0, 0))) for j in range(k)], axis=2)
    dw = jnp.einsum("bsc,bsjf->jcf", xp, dy_shifted, precision=precision)
    return dx, dw.astype(w.dtype)


_conv1d.defvjp(_conv1d_fwd, _conv1d_bwd)


def conv1d_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for the plain stride-1 [B, T, C] x [k, C, F] case.

    Same forward and input gradient (XLA's convolution); only the kernel gradient
    is computed differently (see ``_conv1d_bwd``). Passed to ``nn.Conv`` so the
    parameters keep nn.Conv's names, shapes and initialisers.
    """
    if (tuple(window_strides) != (1,) or feature_group_count != 1
            or any(d not in (None, 1, (1,)) for d in (lhs_dilation, rhs_dilation))
            or lhs.ndim != 3 or rhs.ndim != 3):
        raise ValueError("conv1d_general_dilated supports stride-1, undilated, ungrouped 1-D convolutions only")
    if tuple(dimension_numbers) != tuple(lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NWC", "WIO", "NWC"))):
        raise ValueError(f"conv1d_general_dilated expects NWC/WIO layouts, got {dimension_numbers}")
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv1d(lhs, rhs, padding, dimension_numbers, precision)


class Conv1d(nn.Module, kw_only=True):
    """Centred ``torch.nn.Conv1d(padding=k//2)`` over [B, T, C]; even k yields T+1 steps."""

    features: int
    kernel_size: int
    policy: Policy

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        init = torch_uniform(x.shape[-1] * k)
        return nn.Conv(
            features=self.features,
            kernel_size=(k,),
            padding=[(k // 2, k // 2)],
            kernel_init=init,
            bias_init=init,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            conv_general_dilated=conv1d_general_dilated,
            name="conv",
        )(x)


def layer_norm(*, policy: Policy, name: str | None = None, **module_kwargs) -> nn.LayerNorm:
    """LayerNorm with torch's epsilon; statistics and output in f32 (``parent=None``: unbound)."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=policy.param_dtype, name=name, **module_kwargs)


def group_norm(*, num_groups: int, policy: Policy, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=LN_EPS, dtype=jnp.float32, param_dtype=policy.param_dtype, name=name
    )


def embed(
    *, num_embeddings: int, features: int, policy: Policy, std: float = 1.0, name: str | None = None
) -> nn.Embed:
    """``nn.Embedding``; std 1.0 is torch's default, 0.02 where the original re-inits."""
    return nn.Embed(
        num_embeddings=num_embeddings,
        features=features,
        embedding_init=normal(std),
        dtype=jnp.float32,
        param_dtype=policy.param_dtype,
        name=name,
    )


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The original's sin/cos table [max_len, d_model] (f32 constant)."""
    pe = np.zeros((max_len, d_model), dtype=np.float32)
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term[: d_model // 2])
    return pe


def unmask_first_if_all_masked(valid: jax.Array) -> jax.Array:
    """torch's ``kpm[all_masked, 0] = False`` on a validity mask [..., K] (True = attend)."""
    return valid.at[..., 0].set(valid[..., 0] | ~valid.any(-1))
