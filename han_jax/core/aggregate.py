"""One aggregation of task losses, shared by every phase.

The audit (``docs/audit.md`` sections 1 and 3) found that the original's train and
validation totals were Kendall-weighted while its test total was a plain mean.
Here ``train_step``, ``eval_step`` and ``test_step`` all call :func:`aggregate`,
which returns both the weighted total and the simple mean (plus the
decomposition of the former), so the three phases always report the same,
comparable numbers.

Kendall et al. 2018, as ``MultiTaskLoss.forward`` at ML-OSINT 75d6392::

    total = sum_i [0.5 exp(-lv_i) min(L_i, 1e6) + 0.5 lv_i] + 0.01 sum_i log_var_i^2
    lv_i  = clip(log_var_i, -2, 2)

over the included tasks (finite and non-zero losses); with none included,
``total = 1e-6 sum_all log_var^2`` keeps the log-variances connected.

Deliberate differences from the original:
  * An infinite task loss is excluded like NaN (the original skipped only
    NaN and clamped +inf to 1e6, letting a diverged task dominate).
  * The clip of ``log_var`` passes gradient at the boundaries (torch's
    ``clamp`` does; ``jnp.clip`` would halve it there).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp

from han_jax.config import AggregateConfig

Array = jax.Array

# AggregateConfig.strategy's values.
STRATEGIES = ("kendall", "equal")


@flax.struct.dataclass
class AggregateInfo:
    """The decomposition of one aggregated total.

    ``weighted_total == data_term + uncertainty_term + reg_term`` always.

    Attributes:
      weighted_total: what the strategy returns (the objective).
      simple_total: plain mean of the included raw task losses.
      data_term: sum of ``0.5 * precision * L`` over included tasks.
      uncertainty_term: sum of ``0.5 * clipped log_var`` over included tasks.
      reg_term: the log-variance regulariser (or the no-task fallback).
      weight: per task, the precision ``exp(-clipped log_var)``.
      contribution: per task, ``0.5 * precision * L + 0.5 * lv`` (0 if excluded).
      included: per task, whether the loss took part.
    """

    weighted_total: Array
    simple_total: Array
    data_term: Array
    uncertainty_term: Array
    reg_term: Array
    weight: dict
    contribution: dict
    included: dict


def init_log_vars(
    task_priors: Mapping[str, float],
    priors: Union[Mapping[str, float], float, None] = None,
) -> dict:
    """Initial log-variances: each task's own prior by default (the original's, ``han_jax.tasks``).

    Args:
      task_priors: ``{task: prior}`` of the tasks to create a log-variance for, in order.
      priors: ``None`` for ``task_priors``, a float for every task, or a dict (tasks it
        lacks start at 0.0, as in the original).

    Returns:
      ``{task: f32 scalar}``.
    """
    if priors is None:
        return {t: jnp.float32(p) for t, p in task_priors.items()}
    if isinstance(priors, Mapping):
        unknown = set(priors) - set(task_priors)
        if unknown:
            raise ValueError(
                f"init_log_vars: priors name unknown tasks {sorted(unknown)}; tasks are {list(task_priors)}")
        return {t: jnp.float32(priors.get(t, 0.0)) for t in task_priors}
    return {t: jnp.float32(float(priors)) for t in task_priors}


def _torch_clamp(x: Array, lo: float, hi: float) -> Array:
    """``torch.clamp``: gradient 1 inside [lo, hi] inclusive, 0 outside."""
    return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def aggregate(
    task_losses: Mapping[str, Array],
    log_vars: Mapping[str, Array],
    config: AggregateConfig = AggregateConfig(),
    *,
    task_names: Optional[Sequence[str]] = None,
) -> tuple[Array, AggregateInfo]:
    """Combines raw task losses into one total.

    Args:
      task_losses: ``{task: scalar}`` from ``compute_losses``.
      log_vars: ``{task: scalar}`` learnable log-variances (every task weighed).
      config: ``strategy="kendall"`` (uncertainty weighting, default) or
        ``"equal"`` (plain mean of the included losses).
      task_names: the tasks the total weighs, in the order their terms are summed;
        default ``config.task_names``, else every task of ``task_losses``.

    Returns:
      (total, :class:`AggregateInfo`). Excluded tasks (NaN, inf or exactly 0)
      contribute exactly zero, with zero gradient.
    """
    if config.strategy not in STRATEGIES:
        raise ValueError(f"AggregateConfig.strategy is {config.strategy!r}; expected one of {STRATEGIES}")
    names = tuple(task_names or config.task_names or task_losses)
    missing = [t for t in names if t not in log_vars]
    if missing:
        raise ValueError(f"aggregate: log_vars lack tasks {missing}; it has {sorted(log_vars)}")

    zero = jnp.float32(0.0)
    data_term = uncertainty_term = raw_sum = n_included = lv_sq_included = zero
    weight, contribution, included, safe_losses = {}, {}, {}, {}
    for task in names:
        raw_lv = jnp.asarray(log_vars[task], jnp.float32)
        lv = _torch_clamp(raw_lv, -config.log_var_clip, config.log_var_clip)
        precision = jnp.exp(-lv)
        weight[task] = precision
        if task not in task_losses:
            continue
        loss = jnp.asarray(task_losses[task], jnp.float32)
        use = jnp.isfinite(loss) & (loss != 0)
        # Select before any arithmetic so that a NaN/inf loss leaks no NaN gradient.
        safe = jnp.where(use, loss, 0.0)
        capped = jnp.minimum(safe, config.max_task_loss)
        data = jnp.where(use, 0.5 * precision * capped, 0.0)
        unc = jnp.where(use, 0.5 * lv, 0.0)
        data_term = data_term + data
        uncertainty_term = uncertainty_term + unc
        raw_sum = raw_sum + safe
        safe_losses[task] = safe
        n_included = n_included + use.astype(jnp.float32)
        lv_sq_included = lv_sq_included + jnp.where(use, jnp.square(raw_lv), 0.0)
        contribution[task] = data + unc
        included[task] = use

    any_included = n_included > 0
    simple_total = raw_sum / jnp.maximum(n_included, 1.0)
    all_lv_sq = sum(jnp.square(jnp.asarray(log_vars[t], jnp.float32)) for t in names)
    empty = config.empty_reg * all_lv_sq

    if config.strategy == "kendall":
        reg_term = jnp.where(any_included, config.log_var_reg * lv_sq_included, empty)
        total = data_term + uncertainty_term + reg_term
    else:
        # Plain mean: the log-variances take no part, except to stay connected.
        data_term, uncertainty_term = simple_total, zero
        contribution = {t: safe_losses[t] / jnp.maximum(n_included, 1.0) for t in included}
        reg_term = jnp.where(any_included, 0.0, empty)
        total = simple_total + reg_term

    info = AggregateInfo(
        weighted_total=total,
        simple_total=simple_total,
        data_term=data_term,
        uncertainty_term=uncertainty_term,
        reg_term=reg_term,
        weight=weight,
        contribution=contribution,
        included=included,
    )
    return total, info
