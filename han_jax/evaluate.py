"""Scoring a state on whole splits: exact split metrics, baselines and skill, tables, ``han-jax evaluate``.

Every split is scored through ``eval_step``/``test_step`` (the shared path) and
a :class:`~han_jax.metrics.SplitAccumulator`, so its numbers are those of one
batch holding the whole split, whatever the batch size or device count. Beside
the model, the naive forecasters of :mod:`han_jax.baselines` (fitted on the
training split only) are scored on the same rows, and ``skill/<task>`` says how
much of the best baseline's error the model removes.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np

from han_jax.baselines import baseline_metrics, fit_baselines, skill, split_targets
from han_jax.compilation_cache import prefetch
from han_jax.config import TASK_NAMES, Config
from han_jax.data import Datasets, SplitData
from han_jax.metrics import SplitAccumulator, forecast_sources
from han_jax.parallel import Parallel, make_parallel
from han_jax.runs import load_checkpoint, prepare, read_run_config, write_json
from han_jax.validation import check_batching

SPLITS = ("train", "val", "test")


def split_baselines(datasets: Datasets, config: Config) -> dict:
    """``{split: baseline metrics}``: the naive forecasters, fitted on the training split only.

    They do not depend on the model, so a run computes them once and reuses them
    every epoch (:func:`with_baselines`).
    """
    kw = dict(n_regime_classes=config.model.n_regime_classes, phase_to_coarse=config.step.loss.phase_to_coarse)
    baselines = fit_baselines(split_targets(datasets.train), **kw)
    return {name: baseline_metrics(baselines, split_targets(getattr(datasets, name)),
                                   forecast_sources=forecast_sources(config.model), **kw)
            for name in SPLITS}


def with_baselines(metrics: Mapping, baselines: Mapping) -> dict:
    """``metrics`` plus the baselines' numbers on the same split and the model's skill against them."""
    out = {**metrics, **baselines}
    out.update(skill(out))
    return out


def evaluate_split(step_fn, state, split: SplitData, batch_size: int, *, config: Config,
                   parallel: Optional[Parallel] = None, predictions: bool = False):
    """Exact metrics of ``state`` on a whole split (and, if asked, every real row's predictions).

    Args:
      step_fn: a compiled ``eval`` or ``test`` step of ``parallel``'s layout.
      state: the train state, placed by ``parallel.put_state``.
      split: the split to score.
      batch_size: rows per step (any: the numbers do not depend on it).
      config: the run's configuration.
      parallel: the layout (:func:`han_jax.parallel.make_parallel`); default one device.
      predictions: collect the test step's per-row predictions.

    Returns:
      (metrics, predictions or None): predictions are numpy arrays over the
      split's rows in order, padding dropped.
    """
    parallel = Parallel("single", 1) if parallel is None else parallel
    acc = SplitAccumulator()
    rows = []
    for inputs, targets in parallel.batches(split, batch_size):
        out = step_fn(state, inputs, targets)
        acc.update(out.statistics, device_axis=parallel.device_axis)
        if predictions:
            p = jax.device_get(out.predictions)
            if parallel.device_axis:
                p = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), p)
            keep = np.asarray(p.pop("sample_mask"), bool)
            rows.append({k: np.asarray(v)[keep] for k, v in p.items()})
    log_vars = parallel.first(state.log_vars)
    metrics = acc.result(log_vars, config)
    if not predictions:
        return metrics, None
    return metrics, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}


def score_splits(state, datasets: Datasets, config: Config, batch_size: int, *, parallel: Optional[Parallel] = None,
                 baselines: Optional[Mapping] = None, predictions: bool = False):
    """``{split: metrics}`` for train, val and test through the test step, with baselines and skill.

    Args:
      state, datasets, config, batch_size, parallel: as for :func:`evaluate_split`.
      baselines: :func:`split_baselines`' output, if the caller already has it.
      predictions: also return every split's per-row test-step predictions.

    Returns:
      ``{split: metrics}``; with ``predictions``, ``({split: metrics}, {split: predictions})``.
    """
    parallel = Parallel("single", 1) if parallel is None else parallel
    steps = parallel.steps(config)
    baselines = split_baselines(datasets, config) if baselines is None else baselines
    out, rows = {}, {}
    for name in SPLITS:
        split = getattr(datasets, name)
        metrics, rows[name] = evaluate_split(steps.test, state, split, batch_size, config=config,
                                             parallel=parallel, predictions=predictions)
        out[name] = with_baselines(metrics, baselines[name])
    return (out, rows) if predictions else out


def fallback_tasks(metrics: Mapping) -> list:
    """Tasks whose loss had no target row in this split (their loss is the original's fallback regulariser)."""
    return [t for t in TASK_NAMES if metrics.get(f"targets/{t}") == 0]


def metrics_table(final: Mapping[str, Mapping], *, title: str) -> str:
    """The side-by-side table of splits: totals, task losses (fallback-only ones marked), metrics, baselines, skill."""
    splits = [s for s in SPLITS if s in final]
    first = final[splits[0]]
    fallback = {t for t in TASK_NAMES if all(final[s].get(f"targets/{t}") == 0 for s in splits)}
    keys = ["weighted_total", "simple_total", "data_term", "uncertainty_term", "reg_term"]
    keys += [f"loss/{t}" for t in TASK_NAMES if f"loss/{t}" in first]
    keys += [f"targets/{t}" for t in TASK_NAMES if f"targets/{t}" in first]
    keys += ["regime_accuracy", "baseline/regime_accuracy", "regime_balanced_accuracy",
             "baseline/regime_balanced_accuracy", "baseline/transition_bce", "casualty_mae", "baseline/casualty_mae",
             "anomaly_mse", "baseline/anomaly_mse", "forecast_mse", "forecast_next_mse",
             "baseline/forecast_persistence_mse", "baseline/forecast_climatology_mse"]
    keys += sorted(k for k in first if k.startswith("skill/") and k.count("/") == 1)
    keys += ["n_rows"]
    width = max(len(k) for k in keys) + 14
    lines = [f"{'metric':{width}s} " + " ".join(f"{s:>12s}" for s in splits)]
    for k in keys:
        if k not in first:
            continue
        cells = [final[s].get(k) for s in splits]
        label = k + ("  (fallback: no targets)" if k.startswith("loss/") and k[5:] in fallback else "")
        lines.append(f"{label:{width}s} " + " ".join(f"{'n/a':>12s}" if v is None else f"{v:12.4f}" for v in cells))
    per_source = sorted(k for k in first if k.startswith("forecast_next_mse/"))
    if per_source:
        lines.append("next-month forecast MSE per source (model / persistence / climatology):")
        for k in per_source:
            src = k.split("/", 1)[1]
            cells = []
            for s in splits:
                vals = [final[s].get(k), final[s].get(f"baseline/forecast_persistence_mse/{src}"),
                        final[s].get(f"baseline/forecast_climatology_mse/{src}")]
                cells.append("/".join("n/a" if v is None else f"{v:.3g}" for v in vals))
            lines.append(f"  {src:{width - 2}s} " + " ".join(f"{c:>24s}" for c in cells))
    return f"{title}\n" + "\n".join(lines)


def evaluate_run(run_dir: str, *, checkpoint: str = "best", batch_size: Optional[int] = None,
                 num_devices: int = 1, parallel: str = "sharded", data_overrides: Optional[dict] = None,
                 out: Optional[str] = None, log=print) -> dict:
    """Scores a saved run on train, val and test (``han-jax evaluate``).

    Args:
      run_dir: a folder written by ``han-jax train``.
      checkpoint: ``"best"`` or ``"latest"``.
      batch_size: rows per step (default: the run's); the numbers do not depend on it.
      num_devices: local devices that share each step; the numbers do not depend on it.
      parallel: how they share it, ``"sharded"`` or ``"pmap"`` (:mod:`han_jax.parallel`).
      data_overrides: ``DataConfig`` fields to change (default: the run's own data).
      out: where to write ``{split: {metric: value}}`` JSON.

    Returns:
      ``{split: metrics}``.
    """
    import dataclasses

    config = read_run_config(run_dir)
    if data_overrides:
        config = config.replace(data=dataclasses.replace(config.data, **data_overrides))
    batch_size = config.train.batch_size if batch_size is None else batch_size
    check_batching(batch_size, num_devices, batch_field="--batch-size", devices_field="--devices")
    datasets, resolved = prepare(config)
    if resolved.model != config.model:
        raise ValueError(f"{run_dir}: the data's source layout {resolved.model.daily_sources} / "
                         f"{resolved.model.monthly_sources} differs from the run's model")
    layout = make_parallel(dataclasses.replace(config.train, num_devices=num_devices, parallel=parallel))
    prefetch(layout.steps(config).test)  # a warm start loads it while the checkpoint is read
    state = layout.put_state(load_checkpoint(run_dir, checkpoint, config, datasets))
    final = score_splits(state, datasets, config, batch_size, parallel=layout)
    log(metrics_table(final, title=f"{run_dir} ({checkpoint} checkpoint, batch size {batch_size}, "
                                   f"{num_devices} device(s), {layout.kind}): exact split metrics"))
    if out:
        write_json(out, final)
    return final
