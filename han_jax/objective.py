"""The objective: one statistics pass over the tasks, the Kendall aggregate, and every metric a phase reports.

The audit (``docs/audit.md``) found the original's train, validation and test totals formed
three different ways. Here every phase goes through the two functions of this module:

* :func:`forward_statistics` sanitises the model outputs as the original does, then runs
  each task's :meth:`~han_jax.tasks.base.Task.statistics` **once**, vmapped over a stack of
  row masks: all real rows, and validation's two observation-rate strata (``high_obs``,
  ``low_obs``). It returns the task losses of the all-rows lane (the objective, each behind
  a gate that sends back zero gradient when the loss is not finite) and the statistics of
  every lane (without gradient).
* :func:`metrics_from_statistics` finalises statistics into losses (every lane), aggregates
  each lane with :func:`~han_jax.core.aggregate.aggregate`, and adds every task's metrics.
  It runs inside a step (one batch's numbers) and on the host, on statistics merged over a
  whole split (:func:`merge_statistics` is exact), which gives the numbers of one batch
  holding the split, for any batch size and device count.

The objective a train step differentiates is the aggregate of the all-rows lane's losses;
the reported ``weighted_total`` is :func:`metrics_from_statistics` of the same statistics:
one computation, two readings.

Deliberate differences from the original, all for the sake of parity between phases and devices:
  * Padding rows (``Targets.sample_mask`` False) are excluded from every reduction,
    including the fallbacks, exactly as if the row were absent.
  * The observation-rate strata are computed per row from the shared total (the original
    filed whole-batch totals by the batch's rate) and share the batch's NaN replacement
    (:func:`sanitize_outputs` decides it over all real rows).
  * A task whose loss is not finite sends back zero gradient (:func:`finite_or_zero_grad`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.config import AggregateConfig, LossConfig, ModelConfig
from han_jax.core.aggregate import AggregateInfo, aggregate, init_log_vars
from han_jax.core.batch import Targets
from han_jax.core.reductions import masked_mean, masked_sum, psum
from han_jax.tasks import Task, loss_key, targets_key
from han_jax.tasks import tasks as registered_tasks

Array = jax.Array

# The original validate()'s strata of the monthly observation rate: (name, rows it keeps).
OBS_STRATA = (("high_obs", lambda rate: rate > 0.8), ("low_obs", lambda rate: rate < 0.5))

# The keys of the aggregate's decomposition (AggregateInfo's scalars), reported by every phase.
TOTALS = ("weighted_total", "simple_total", "data_term", "uncertainty_term", "reg_term")
# Per-task keys of the aggregate: raw loss, Kendall weight, contribution, inclusion.
PER_TASK = ("loss", "weight", "contribution", "included")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step's losses and metrics are: the tasks, the model they read, the loss and aggregate options.

    Frozen and hashable: part of the static step specification.

    Attributes:
      tasks: the tasks, in report order (``han_jax.tasks.tasks()`` when a run starts).
      model: the model configuration with its source layout (metrics per source, class counts).
      loss: the loss options.
      aggregate: the aggregate's options.
    """

    tasks: tuple
    model: ModelConfig
    loss: LossConfig = LossConfig()
    aggregate: AggregateConfig = AggregateConfig()

    @property
    def weighted(self) -> tuple:
        """The tasks the total weighs, in order: each has a log-variance."""
        return tuple(self.aggregate.task_names or (t.name for t in self.tasks))

    def init_log_vars(self, priors=None) -> dict:
        """The weighted tasks' initial log-variances: their own priors, or ``priors`` (a float for all)."""
        own = {t.name: t.prior for t in self.tasks}
        return init_log_vars({name: own.get(name, 0.0) for name in self.weighted}, priors)

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)


# ---------------------------------------------------------------------------
# The statistics pass.
# ---------------------------------------------------------------------------


def finite_or_zero_grad(fn):
    """Wraps ``fn(x) -> (loss, aux)``: the gradient flows through ``loss`` alone, and is zero where it is not finite.

    ``aggregate`` excludes a NaN/inf task with a zero cotangent, but inside the task
    ``0 * NaN`` is still NaN (e.g. the square of a NaN target's residual), so the exclusion
    alone would poison every parameter. In torch an excluded loss is simply not in the
    graph; here the backward pass of the task selects (not multiplies) zeros when its loss
    is not finite. ``aux`` is returned as a value without gradient: the backward pass does
    no work for it.
    """

    @jax.custom_vjp
    def wrapped(x):
        return fn(x)

    def fwd(x):
        loss, vjp, aux = jax.vjp(fn, x, has_aux=True)
        return (loss, aux), (vjp, loss)

    def bwd(res, g):
        vjp, loss = res
        (gx,) = vjp(g[0])
        ok = jnp.isfinite(loss)
        return (jax.tree_util.tree_map(lambda v: jnp.where(ok, v, jnp.zeros_like(v)), gx),)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def task_outputs(task: Task, outputs: Mapping) -> tuple:
    """The outputs ``task`` reads from this model: its required ones, and its optional ones the model produced."""
    return task.outputs + tuple(k for k in task.optional_outputs if k in outputs)


def output_keys(tasks: Sequence[Task], outputs: Mapping = {}) -> tuple:
    """Every model output some task reads (all have the batch axis first)."""
    return tuple(dict.fromkeys(k for t in tasks for k in task_outputs(t, outputs)))


def scored_tasks(tasks: Sequence[Task], outputs: Mapping) -> tuple:
    """The tasks a batch is scored on: those whose outputs the model produced."""
    return tuple(t for t in tasks if all(k in outputs for k in t.outputs))


def sanitize_outputs(outputs: Mapping[str, Array], row: Array, keys: Sequence[str],
                     axis_name: Optional[str] = None) -> tuple[dict, Array]:
    """The outputs ``keys`` as f32, NaN replaced the way the original does.

    The original runs ``torch.nan_to_num(x, nan=0.0)`` on an output only when it holds a
    NaN; that call also maps +-inf to the largest finite values, so han-jax does the same,
    per output, with ``jnp.where``. Padding rows (``row`` False) are zeroed first, so that
    nothing in them (not even NaN) reaches a value or a gradient.

    Returns:
      (clean outputs, scalar bool: some output held NaN on a real row, across devices).
    """
    clean, flags = {}, []
    for key in keys:
        x = outputs[key].astype(jnp.float32)
        x = jnp.where(row.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
        has_nan = psum(jnp.any(jnp.isnan(x)).astype(jnp.int32), axis_name) > 0
        clean[key] = jnp.where(has_nan, jnp.nan_to_num(x, nan=0.0), x)
        flags.append(has_nan)
    return clean, (jnp.any(jnp.stack(flags)) if flags else jnp.array(False))


def row_lanes(targets: Targets, strata: bool = True) -> tuple[tuple, Array]:
    """The names and stacked row masks ``[S, B]`` a batch is reduced over: all real rows, then the strata."""
    row = targets.sample_mask.astype(bool)
    if not strata:
        return ("all",), row[None]
    obs = targets.monthly_obs_rate
    masks = [row] + [row & (keep(obs) if obs is not None else jnp.zeros_like(row)) for _, keep in OBS_STRATA]
    return ("all",) + tuple(name for name, _ in OBS_STRATA), jnp.stack(masks)


def forward_statistics(outputs: Mapping[str, Array], targets: Targets, *, tasks: Sequence[Task],
                       loss: LossConfig, axis_name: Optional[str] = None, strata: bool = True
                       ) -> tuple[dict, dict]:
    """The one statistics pass of a batch: the all-rows losses (with gradient) and every lane's statistics.

    Args:
      outputs: the model's output dict, any float dtype.
      targets: the batch's targets (``sample_mask`` marks the real rows).
      tasks: the tasks to score (those whose outputs are present are).
      loss: the loss options.
      axis_name: the pmap axis: statistics are then over all devices.
      strata: also reduce over the observation-rate strata (:data:`OBS_STRATA`).

    Returns:
      ``(losses, statistics)``: ``{task: f32 loss}`` of all real rows, each behind
      :func:`finite_or_zero_grad`; and ``{"tasks": {task: statistics with a leading lane
      axis [S]}, "n_rows": [S], "nan_in_outputs": f32 flag}``, without gradient, every
      leaf additive across batches (:func:`merge_statistics`).
    """
    row = targets.sample_mask.astype(bool)
    scored = scored_tasks(tasks, outputs)
    clean, nan_in_outputs = sanitize_outputs(outputs, row, output_keys(scored, outputs), axis_name)
    _, lanes = row_lanes(targets, strata)
    losses, stats = {}, {}
    for task in scored:
        def task_pass(o, task=task):
            lane_stats = jax.vmap(lambda r: task.statistics(o, targets, r, loss, axis_name))(lanes)
            value, _ = task.finalize(jax.tree_util.tree_map(lambda x: x[0], lane_stats), loss)
            return jnp.asarray(value, jnp.float32), lane_stats

        losses[task.name], stats[task.name] = finite_or_zero_grad(task_pass)(
            {k: clean[k] for k in task_outputs(task, outputs)})
    statistics = {"tasks": stats,
                  "n_rows": masked_sum(lanes.astype(jnp.float32), axis=1, axis_name=axis_name),
                  "nan_in_outputs": nan_in_outputs.astype(jnp.float32)}
    return losses, jax.lax.stop_gradient(statistics)


def _lane(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def loss_statistics(outputs: Mapping[str, Array], targets: Targets, config: LossConfig = LossConfig(), *,
                    axis_name: Optional[str] = None, tasks: Optional[Sequence[Task]] = None) -> dict:
    """One batch's statistics of every task loss over its real rows: ``{task: {name: array or Moments}}``.

    Statistics of disjoint sets of rows merge exactly (:func:`merge_statistics`), and
    :func:`finalize_losses` of the merged statistics gives the losses of one batch holding
    all those rows, although the losses use batch statistics (class counts, variances, mean
    probabilities, fallbacks).
    """
    _, stats = forward_statistics(outputs, targets, tasks=_tasks(tasks), loss=config, axis_name=axis_name,
                                  strata=False)
    return _lane(stats["tasks"], 0)


def finalize_losses(stats: Mapping, config: LossConfig = LossConfig(), *,
                    tasks: Optional[Sequence[Task]] = None) -> tuple[dict, dict]:
    """Task losses from (merged) :func:`loss_statistics`, with the original's floors, penalties and fallbacks.

    Accepts jax or numpy statistics (the host path passes float64 numpy); the arithmetic
    is ``jax.numpy``, so the losses come back as f32 jax arrays.

    Returns:
      (``{task: f32 loss}``, ``{task: number of valid rows/positions}``, 0 where the task
      had no targets or fell back).
    """
    stats = jax.tree_util.tree_map(jnp.asarray, stats)
    by_name = {t.name: t for t in _tasks(tasks)}
    losses, n_valid = {}, {}
    for name, task_stats in stats.items():
        value, count = by_name[name].finalize(task_stats, config)
        losses[name], n_valid[name] = jnp.asarray(value, jnp.float32), jnp.asarray(count, jnp.float32)
    return losses, n_valid


class LossDiagnostics(NamedTuple):
    """What :func:`compute_losses` saw.

    Attributes:
      nan_in_outputs: True if any model output held NaN on a real row (replaced by 0 first).
      n_valid: per task, the number of rows (positions for the forecast) its main branch was
        computed on, across devices; 0 means the fallback was used.
    """

    nan_in_outputs: Array
    n_valid: dict


def compute_losses_with_diagnostics(outputs: Mapping[str, Array], targets: Targets,
                                    config: LossConfig = LossConfig(), *, axis_name: Optional[str] = None,
                                    tasks: Optional[Sequence[Task]] = None) -> tuple[dict, LossDiagnostics]:
    """:func:`compute_losses` plus what it saw (:class:`LossDiagnostics`)."""
    losses, stats = forward_statistics(outputs, targets, tasks=_tasks(tasks), loss=config, axis_name=axis_name,
                                       strata=False)
    _, n_valid = finalize_losses(_lane(stats["tasks"], 0), config, tasks=tasks)
    return losses, LossDiagnostics(nan_in_outputs=stats["nan_in_outputs"] > 0, n_valid=n_valid)


def compute_losses(outputs: Mapping[str, Array], targets: Targets, config: LossConfig = LossConfig(), *,
                   axis_name: Optional[str] = None, tasks: Optional[Sequence[Task]] = None) -> dict:
    """Raw per-task losses of one batch, exactly as the original's ``_compute_losses``.

    Only the last month (``[:, -1]``) of the sequence outputs is scored. Each task has the
    original's three cases: valid targets, no valid rows in the batch (a tiny regulariser
    tied to the outputs, chosen with ``jnp.where``) and no targets at all (the field is
    ``None``; chosen at trace time).

    Args:
      outputs: the model's output dict (``regime_logits [B,M,K]``, ``anomaly_score [B,M,1]``,
        ``casualty_pred [B,M,3]``, ``casualty_var [B,M,3]``, ``forecast_pred [B,M,Ff]`` and
        optionally ``daily_forecast_pred [B,H,·]``), any float dtype.
      targets: a :class:`~han_jax.core.batch.Targets` for the same B rows.
      config: loss options.
      axis_name: the ``pmap`` axis; batch statistics are then taken over all devices so that
        the result equals one device holding every row.
      tasks: the tasks to score (default: the registry's).

    Returns:
      ``{task: f32 scalar}`` for every task whose outputs are present.
    """
    return compute_losses_with_diagnostics(outputs, targets, config, axis_name=axis_name, tasks=tasks)[0]


def _tasks(tasks):
    return registered_tasks() if tasks is None else tuple(tasks)


def statistics_to_host(stats):
    """Statistics fetched to the host as numpy float64, to accumulate with :func:`merge_statistics`.

    Per-batch sums are f32 on the device; summing thousands of them in f32 would lose
    digits, so the running totals of a split are kept in float64.
    """
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(stats))


# ---------------------------------------------------------------------------
# Metrics: what every phase reports.
# ---------------------------------------------------------------------------


def aggregate_metrics(info: AggregateInfo, losses: Mapping[str, Array]) -> dict:
    """The totals and the decomposition of the weighted one, with per task ``loss/``, ``weight/``
    (Kendall precision), ``contribution/`` (its share of the weighted total) and ``included/``."""
    m = {key: getattr(info, key) for key in TOTALS}
    m.update({loss_key(t): v for t, v in losses.items()})
    m.update({f"weight/{t}": v for t, v in info.weight.items()})
    m.update({f"contribution/{t}": v for t, v in info.contribution.items()})
    m.update({f"included/{t}": v.astype(jnp.float32) for t, v in info.included.items()})
    return m


def metrics_from_statistics(statistics: Mapping, log_vars: Mapping[str, Array], objective: Objective) -> dict:
    """Every shared metric from (merged) :func:`forward_statistics` statistics: one definition for every phase.

    The losses of every lane (floors and fallbacks included), then per lane the Kendall
    total, the simple total and (all rows) the decomposition from
    :func:`han_jax.core.aggregate.aggregate`; ``targets/<task>``, the number of rows
    (positions, for the forecast) the task's loss was computed on (0: the original's
    fallback regulariser); ``<stratum>/weighted_total``, ``.../simple_total``,
    ``.../n_rows``; every task's metrics; ``n_rows`` and ``nan_in_outputs``. Mean-valued
    metrics with no valid row are 0 here; :func:`to_host_metrics` turns them into None.

    Works inside ``jit`` (a batch's own numbers) and on host statistics.
    """
    stats = jax.tree_util.tree_map(jnp.asarray, statistics)
    by_name = {t.name: t for t in objective.tasks}
    losses, n_valid = {}, {}
    for name, lane_stats in stats["tasks"].items():
        value, count = jax.vmap(lambda s, task=by_name[name]: task.finalize(s, objective.loss))(lane_stats)
        losses[name], n_valid[name] = jnp.asarray(value, jnp.float32), jnp.asarray(count, jnp.float32)
    _, info = jax.vmap(lambda ls: aggregate(ls, log_vars, objective.aggregate, task_names=objective.weighted))(losses)

    m = aggregate_metrics(_lane(info, 0), _lane(losses, 0))
    m.update({targets_key(t): n[0] for t, n in n_valid.items()})
    m["n_rows"] = stats["n_rows"][0]
    for i, (name, _) in enumerate(OBS_STRATA, start=1):
        if stats["n_rows"].shape[0] > i:
            m.update({f"{name}/weighted_total": info.weighted_total[i], f"{name}/simple_total": info.simple_total[i],
                      f"{name}/n_rows": stats["n_rows"][i]})
    for name, lane_stats in stats["tasks"].items():
        m.update(by_name[name].metrics(_lane(lane_stats, 0), objective.model))
    m["nan_in_outputs"] = (stats["nan_in_outputs"] > 0).astype(jnp.float32)
    return m


def count_key(key: str, tasks: Sequence[Task]) -> Optional[str]:
    """The count a mean-valued metric is computed over (None: the key is a count, flag or vector)."""
    for task in tasks:
        count = task.count_key(key)
        if count is not None:
            return count
    if key in TOTALS or key.startswith(tuple(f"{p}/" for p in PER_TASK)):
        return "n_rows"
    for name, _ in OBS_STRATA:
        if key in (f"{name}/weighted_total", f"{name}/simple_total"):
            return f"{name}/n_rows"
    return None


def to_host_metrics(metrics: Mapping, tasks: Sequence[Task]) -> dict:
    """Python numbers (lists for per-class vectors); a mean-valued metric with no valid row is None, not 0."""
    host = jax.device_get(dict(metrics))
    out = {}
    for key, value in host.items():
        value = np.asarray(value, np.float64)
        out[key] = value.tolist() if value.ndim else float(value)
    for key in list(out):
        count = count_key(key, tasks)
        if count is not None and out.get(count) == 0:
            out[key] = None
    return out


# ---------------------------------------------------------------------------
# The train-only regulariser.
# ---------------------------------------------------------------------------


def temporal_regularization(
    outputs: Mapping[str, Array],
    row: Optional[Array] = None,
    *,
    correlation_weight: float = 0.01,
    smoothness_weight: float = 0.001,
    target_roughness: float = 0.1,
    axis_name: Optional[str] = None,
) -> tuple[Array, dict]:
    """The original's ``TemporalRegularizer`` (train only, off by default).

    Penalises casualty predictions and regime probabilities that correlate positively
    with the month position, and casualty predictions that are smoother than
    ``target_roughness``. Stds are ``ddof=1`` as in torch.

    Note (faithful quirk): the regime term correlates the class-mean of the softmax, which
    is ``1/K`` at every month, so it is ~0 by construction.

    Args:
      outputs: model outputs with ``casualty_pred`` and ``regime_logits``.
      row: [B] bool, real rows (padding excluded); all rows when None.
      axis_name: the pmap axis, for means across devices.

    Returns:
      (penalty, {"casualty_corr", "casualty_smooth", "regime_corr"}).
    """
    breakdown = {}
    total = jnp.float32(0.0)

    def correlation(pred, rows):
        flat = pred.mean(axis=-1) if pred.ndim == 3 else pred  # [B, M]
        m = flat.shape[1]
        pos = jnp.arange(m, dtype=jnp.float32)
        pos = (pos - pos.mean()) / (jnp.std(pos, ddof=1) + 1e-8)
        mean = flat.mean(axis=-1, keepdims=True)
        std = jnp.std(flat, axis=-1, ddof=1, keepdims=True) + 1e-8
        corr = jnp.mean((flat - mean) / std * pos[None, :], axis=-1)
        value, _ = masked_mean(jax.nn.relu(corr), rows, axis_name=axis_name)
        return value

    if "casualty_pred" in outputs:
        pred = outputs["casualty_pred"].astype(jnp.float32)
        rows = jnp.ones(pred.shape[:1], bool) if row is None else row
        breakdown["casualty_corr"] = correlation(pred, rows)
        deltas = pred[:, 1:] - pred[:, :-1]
        roughness = jnp.mean(jnp.square(deltas), axis=1)  # [B, F]
        breakdown["casualty_smooth"], _ = masked_mean(
            jax.nn.relu(target_roughness - roughness), rows[:, None], axis_name=axis_name
        )
        total = total + correlation_weight * breakdown["casualty_corr"]
        total = total + smoothness_weight * breakdown["casualty_smooth"]
    if "regime_logits" in outputs:
        probs = jax.nn.softmax(outputs["regime_logits"].astype(jnp.float32), axis=-1)
        rows = jnp.ones(probs.shape[:1], bool) if row is None else row
        breakdown["regime_corr"] = correlation(probs, rows)
        total = total + correlation_weight * breakdown["regime_corr"]
    return total, breakdown
