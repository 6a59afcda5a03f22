"""Mixed-precision policy and dynamic loss scaling.

One :class:`Policy` decides the dtypes of a run: parameters are stored in
``param_dtype``, matmuls and attention run in ``compute_dtype`` and everything
handed to the losses comes back in ``output_dtype``. The policy is part of the
configuration that ``train_step``, ``eval_step`` and ``test_step`` all receive,
so no phase can silently run at a different precision (the original ran its
test phase without autocast; ``docs/audit.md`` section 2).

float16 needs loss scaling because its exponent range is narrow; bfloat16 and
float32 do not. :class:`DynamicLossScale` is the usual grow/shrink scheme (as in
jmp and PyTorch's ``GradScaler``): steps whose gradients are not finite are
skipped and halve the scale, and ``period`` finite steps in a row double it.
han-jax carries its own small implementation rather than depending on jmp,
which is archived; the behaviour is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any

_DTYPE_NAMES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
}

PRESETS = {
    "f32": "params=float32,compute=float32,output=float32",
    "bf16": "params=float32,compute=bfloat16,output=float32",
    "f16": "params=float32,compute=float16,output=float32",
}


def _parse_dtype(name: str, field: str) -> jnp.dtype:
    try:
        return jnp.dtype(_DTYPE_NAMES[name.strip().lower()])
    except KeyError:
        raise ValueError(
            f"precision policy: field {field!r} has dtype {name!r}; expected one of "
            f"{sorted(set(_DTYPE_NAMES))}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters, computation and outputs use.

    Attributes:
      param_dtype: dtype parameters are created and stored in.
      compute_dtype: dtype of matmuls, convolutions and attention.
      output_dtype: dtype of the model outputs handed to the losses.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        # Normalise to numpy dtypes so that equal policies hash equal (the policy
        # is a static argument of every jitted step).
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, jnp.dtype(getattr(self, field)))

    @classmethod
    def from_string(cls, spec: str) -> "Policy":
        """Parses ``"f32"``/``"bf16"``/``"f16"`` or ``"params=..,compute=..,output=.."``."""
        spec = PRESETS.get(spec.strip().lower(), spec)
        keys = {"params": "param_dtype", "compute": "compute_dtype", "output": "output_dtype"}
        values = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(
                    f"precision policy {spec!r}: part {part!r} is not 'key=dtype'; expected a preset "
                    f"{sorted(PRESETS)} or 'params=..,compute=..,output=..'"
                )
            key, name = (s.strip().lower() for s in part.split("=", 1))
            if key not in keys:
                raise ValueError(
                    f"precision policy {spec!r}: unknown field {key!r}; expected {sorted(keys)}"
                )
            values[keys[key]] = _parse_dtype(name, key)
        return cls(**values)

    @property
    def name(self) -> str:
        for preset, spec in PRESETS.items():
            if Policy.from_string(spec) == self:
                return preset
        return (
            f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name}"
        )

    @property
    def needs_loss_scaling(self) -> bool:
        return self.compute_dtype == jnp.float16 or self.param_dtype == jnp.float16


@flax.struct.dataclass
class NoOpLossScale:
    """Loss scale for f32/bf16: scaling is the identity and every step counts."""

    loss_scale: jax.Array = flax.struct.field(default_factory=lambda: jnp.float32(1.0))

    def scale(self, tree: PyTree) -> PyTree:
        return tree

    def unscale(self, tree: PyTree) -> PyTree:
        return tree

    def adjust(self, grads_finite: jax.Array) -> "NoOpLossScale":
        del grads_finite
        return self


@flax.struct.dataclass
class DynamicLossScale:
    """Dynamic loss scale for float16 (grow after ``period`` good steps, halve on overflow).

    Attributes:
      loss_scale: the current scale (f32 scalar).
      counter: finite steps since the last change.
      period: finite steps before the scale grows by ``factor``.
      factor: growth and shrink factor.
      min_loss_scale: the scale never shrinks below this.
    """

    loss_scale: jax.Array
    counter: jax.Array = flax.struct.field(default_factory=lambda: jnp.int32(0))
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: int = flax.struct.field(pytree_node=False, default=2)
    min_loss_scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def scale(self, tree: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

    def unscale(self, tree: PyTree) -> PyTree:
        inv = 1.0 / self.loss_scale
        return jax.tree_util.tree_map(lambda x: (x.astype(jnp.float32) * inv).astype(x.dtype), tree)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        grow = grads_finite & (self.counter == self.period - 1)
        new_scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.loss_scale * self.factor, self.loss_scale),
            jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale),
        )
        new_counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0)
        return self.replace(loss_scale=new_scale.astype(jnp.float32), counter=new_counter.astype(jnp.int32))


def make_loss_scale(policy: Policy, initial_scale: float = 2.0**15):
    """The loss scale a policy needs: dynamic for float16, the identity otherwise."""
    if policy.needs_loss_scaling:
        return DynamicLossScale(loss_scale=jnp.float32(initial_scale))
    return NoOpLossScale()
