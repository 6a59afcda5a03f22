"""The learning-rate curve as run-time values: changing it (or the number of epochs) recompiles nothing.

The original's ``WarmupCosineScheduler`` is optax's ``warmup_cosine_decay_schedule``: a
linear warmup from ``learning_rate * warmup_start_factor`` over ``min(warmup_epochs,
epochs - 1)`` epochs, then a cosine decay to ``min_lr`` at ``epochs``; in ``"step"`` mode
the same curve is stretched over optimiser updates. optax builds it from Python numbers,
which a jitted step would bake in as constants, so every new learning rate or epoch count
would compile every step again. :class:`Schedule` holds the curve's constants as arrays,
passed to the steps like any other argument, and evaluates optax's formulas with optax's
operations in optax's order (``tests/test_schedule.py`` checks it against optax to 1e-6 of the
learning rate: XLA folds optax's Python constants at compile time, the run-time values it cannot).

A one-epoch run has no warmup: its epoch starts the decay at ``learning_rate``. A warmup
epoch would leave no epoch to decay over (optax refuses a cosine of length 0) and would
train only at ``learning_rate * warmup_start_factor``. Runs of two epochs or more get the
original's curve unchanged.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from han_jax.config import OptimConfig

# OptimConfig.schedule_unit's values.
SCHEDULE_UNITS = ("epoch", "step")


@flax.struct.dataclass
class Schedule:
    """Warmup then cosine decay, from f32 constants (a pytree, so a run-time argument of a jitted step).

    Attributes:
      warmup_steps: the warmup's length W (epochs or updates).
      decay_steps: the cosine's length after the warmup, D = total - W.
      warmup_delta: ``init - peak``, the warmup's start above its end (computed in float64, as optax does).
      peak: the learning rate at the end of the warmup.
      alpha: ``min_lr / peak``; ``one_minus_alpha``: ``1 - alpha`` (float64 first, as optax).
    """

    warmup_steps: jax.Array
    decay_steps: jax.Array
    warmup_delta: jax.Array
    peak: jax.Array
    alpha: jax.Array
    one_minus_alpha: jax.Array

    def __call__(self, count) -> jax.Array:
        """The learning rate after ``count`` epochs (or updates): optax's ``warmup_cosine_decay_schedule``."""
        count = jnp.asarray(count, jnp.float32)
        # linear_schedule(init, peak, W): count clipped into [0, W], frac = 1 - count / W.
        frac = 1 - jnp.clip(count, 0, self.warmup_steps) / jnp.maximum(self.warmup_steps, 1.0)
        warm = self.warmup_delta * frac + self.peak
        # cosine_decay_schedule(peak, D, alpha) at count - W, joined at the boundary W.
        c = jnp.minimum(count - self.warmup_steps, self.decay_steps)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * c / self.decay_steps))
        decayed = self.one_minus_alpha * cosine + self.alpha
        return jnp.where(count < self.warmup_steps, warm, self.peak * decayed)

    @classmethod
    def of(cls, optim: OptimConfig, *, epochs: int, steps_per_epoch: int = 1) -> "Schedule":
        """The curve of ``optim`` over ``epochs`` (times ``steps_per_epoch`` in ``"step"`` mode).

        Raises:
          ValueError: an unknown ``schedule_unit``.
        """
        if optim.schedule_unit not in SCHEDULE_UNITS:
            raise ValueError(f"OptimConfig.schedule_unit is {optim.schedule_unit!r}; expected one of {SCHEDULE_UNITS}")
        warmup, total = max(0, min(optim.warmup_epochs, epochs - 1)), epochs
        if optim.schedule_unit == "step":
            warmup, total = warmup * steps_per_epoch, total * steps_per_epoch
        peak = float(optim.learning_rate)
        init = peak * optim.warmup_start_factor
        alpha = 0.0 if peak == 0.0 else optim.min_lr / peak
        return cls(*(np.float32(v) for v in (warmup, total - warmup, init - peak, peak, alpha, 1 - alpha)))
