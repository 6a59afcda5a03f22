"""Scoring a state on whole splits: exact split metrics, baselines and skill, the table, ``han-jax evaluate``.

Every split is scored through the test step (the shared path) and a
:class:`~han_jax.training.accumulate.SplitAccumulator`, so its numbers are those of one
batch holding the whole split, whatever the batch size or device count. Beside the model,
each task's naive baselines (fitted on the training split only) are scored on the same
rows, and ``skill/<task>`` says how much of the best baseline's error the model removes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from han_jax.app.run_folder import check_output_file, read_run_config, saved_data_paths
from han_jax.app.runs import prepare
from han_jax.config import ConfigError
from han_jax.core.batch import Targets
from han_jax.core.files import write_json
from han_jax.data import Datasets, SplitData, iterate_batches
from han_jax.objective import TOTALS
from han_jax.tasks import TableContext, loss_key, targets_key
from han_jax.training.accumulate import SplitAccumulator
from han_jax.training.checkpoints import load_checkpoint
from han_jax.training.compilation_cache import prefetch
from han_jax.training.devices import Devices, SingleDevice, check_batch, make_devices
from han_jax.training.spec import StepSpec

SPLITS = ("train", "val", "test")
# The forecaster name of the model itself among its baselines.
MODEL = "model"


def split_targets(split: SplitData) -> Targets:
    """The targets of a whole split as one numpy batch without padding rows."""
    _, targets = next(iterate_batches(split, len(split)))
    return targets


def split_baselines(datasets: Datasets, spec: StepSpec) -> dict:
    """``{split: baseline metrics}``: every task's naive forecasters, fitted on the training split only.

    They do not depend on the model, so a run computes them once and reuses them every
    epoch (:func:`with_baselines`).
    """
    objective = spec.objective
    train = split_targets(datasets.train)
    fitted = {t.name: t.fit_baseline(train, objective.model, objective.loss) for t in objective.tasks}
    out = {}
    for name in SPLITS:
        targets = split_targets(getattr(datasets, name))
        out[name] = {}
        for task in objective.tasks:
            out[name].update(task.baseline_metrics(fitted[task.name], targets, objective.model, objective.loss))
    return out


def proper_score_keys(task, forecaster: str, score: str) -> str:
    """The metric key of a proper score: ``<task>/<score>`` for the model, ``baseline/<forecaster>/<task>/<score>``."""
    return f"{task.name}/{score}" if forecaster == MODEL else f"baseline/{forecaster}/{task.name}/{score}"


def forecasters(task, predictions: Mapping, train: Targets, targets: Targets, known, ctx: TableContext) -> dict:
    """``{forecaster: forecast}``: the model's predictions, then the task's baselines, all scored alike."""
    return {MODEL: predictions, **task.baseline_forecasts(train, targets, known, ctx)}


def split_scores(predictions: Mapping[str, Mapping], datasets: Datasets, spec: StepSpec) -> dict:
    """``{split: {key: value}}``: every task's proper scores on every split, the model's and its baselines'.

    Computed on the host from the test step's per-row predictions (the same pass as the
    split's metrics); baselines are fitted on the training split only.
    """
    objective = spec.objective
    ctx = TableContext(objective.model, objective.loss, datasets.normalisation, datasets.layout)
    train = split_targets(datasets.train)
    out = {}
    for name in SPLITS:
        targets = split_targets(getattr(datasets, name))
        out[name] = {}
        for task in objective.tasks:
            for forecaster, forecast in forecasters(task, predictions[name], train, targets, None, ctx).items():
                for score, value in task.proper_scores(forecast, targets, ctx).items():
                    out[name][proper_score_keys(task, forecaster, score)] = value
    return out


def with_baselines(metrics: Mapping, baselines: Mapping, tasks: Sequence) -> dict:
    """``metrics`` plus the baselines' numbers on the same split and the model's skill against them.

    The baselines add only ``baseline/...`` keys: every count beside them is the model's.
    """
    clash = sorted(set(metrics) & set(baselines))
    if clash:
        raise ValueError(f"baseline keys {clash} would replace the model's")
    out = {**metrics, **baselines}
    for task in tasks:
        out.update(task.skill(out))
    return out


def evaluate_split(step_fn, state, split: SplitData, batch_size: int, *, spec: StepSpec,
                   devices: Optional[Devices] = None, predictions: bool = False):
    """Exact metrics of ``state`` on a whole split (and, if asked, every real row's predictions).

    Args:
      step_fn: an ``eval`` or ``test`` step of ``devices``' layout, ``(state, inputs, targets) -> StepOutput``.
      state: the train state, placed by ``devices.put_state``.
      split: the split to score.
      batch_size: rows per step (any: the numbers do not depend on it).
      spec: the steps' specification.
      devices: the layout; default one device.
      predictions: collect the test step's per-row predictions.

    Returns:
      (metrics, predictions or None): predictions are numpy arrays over the split's rows in
      order, padding dropped.
    """
    devices = SingleDevice() if devices is None else devices
    acc = SplitAccumulator()
    rows = []
    for inputs, targets in devices.batches(split, batch_size):
        out = step_fn(state, inputs, targets)
        acc.update(out.statistics, device_axis=devices.device_axis)
        if predictions:
            p = jax.device_get(out.predictions)
            if devices.device_axis:
                p = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), p)
            keep = np.asarray(p.pop("sample_mask"), bool)
            rows.append({k: np.asarray(v)[keep] for k, v in p.items()})
    metrics = acc.result(devices.first(state.log_vars), spec.objective)
    if not predictions:
        return metrics, None
    return metrics, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}


def score_splits(state, datasets: Datasets, spec: StepSpec, batch_size: int, *, devices: Optional[Devices] = None,
                 baselines: Optional[Mapping] = None, predictions: bool = False):
    """``{split: metrics}`` for train, val and test through the test step, with baselines and skill.

    Args:
      state, datasets, spec, batch_size, devices: as for :func:`evaluate_split`.
      baselines: :func:`split_baselines`' output, if the caller already has it.
      predictions: also return every split's per-row test-step predictions.

    Returns:
      ``{split: metrics}``; with ``predictions``, ``({split: metrics}, {split: predictions})``.
    """
    devices = SingleDevice() if devices is None else devices
    test = devices.compiled(spec).test
    baselines = split_baselines(datasets, spec) if baselines is None else baselines
    out, rows = {}, {}
    for name in SPLITS:
        metrics, rows[name] = evaluate_split(test, state, getattr(datasets, name), batch_size, spec=spec,
                                             devices=devices, predictions=True)
        out[name] = with_baselines(metrics, baselines[name], spec.objective.tasks)
    for name, proper in split_scores(rows, datasets, spec).items():
        out[name].update(proper)
    return (out, rows) if predictions else out


def fallback_tasks(metrics: Mapping, tasks: Sequence) -> list:
    """Tasks whose loss had no target row in this split (their loss is the original's fallback regulariser)."""
    return [t.name for t in tasks if metrics.get(targets_key(t.name)) == 0]


def metrics_table(final: Mapping[str, Mapping], tasks: Sequence, *, title: str) -> str:
    """The side-by-side table of splits: totals, task losses (fallback-only ones marked), metrics, baselines, skill."""
    splits = [s for s in SPLITS if s in final]
    first = final[splits[0]]
    fallback = {t.name for t in tasks if all(final[s].get(targets_key(t.name)) == 0 for s in splits)}
    keys = list(TOTALS)
    keys += [loss_key(t.name) for t in tasks]
    keys += [targets_key(t.name) for t in tasks]
    keys += [row for t in tasks for row in t.table_rows]
    keys += sorted(k for k in first if k.startswith("skill/") and k.count("/") == 1)
    # Proper scores: the model's, then each baseline's headline score (the rest and per-source breakdowns stay in
    # the JSON).
    keys += [k for t in tasks for k in first if k.startswith(f"{t.name}/") and k.count("/") == 1]
    keys += [k for t in tasks for k in first if t.headline_score and k.startswith("baseline/") and k.count("/") == 3
             and k.split("/")[2:] == [t.name, t.headline_score]]
    keys += ["n_rows"]
    width = max(len(k) for k in keys) + 14
    lines = [f"{'metric':{width}s} " + " ".join(f"{s:>12s}" for s in splits)]
    for k in keys:
        if k not in first:
            continue
        cells = [final[s].get(k) for s in splits]
        label = k + ("  (fallback: no targets)" if k in {loss_key(t) for t in fallback} else "")
        lines.append(f"{label:{width}s} " + " ".join(f"{'n/a':>12s}" if v is None else f"{v:12.4f}" for v in cells))
    for task in tasks:
        lines += task.table_lines(final, splits, width)
    return f"{title}\n" + "\n".join(lines)


def evaluate_run(run_dir: str, *, checkpoint: str = "best", batch_size: Optional[int] = None,
                 num_devices: int = 1, parallel: str = "sharded", data_overrides: Optional[dict] = None,
                 out: Optional[str] = None, force: bool = False, log=print) -> dict:
    """Scores a saved run on train, val and test (``han-jax evaluate``).

    Args:
      run_dir: a folder written by ``han-jax train``.
      checkpoint: ``"best"`` or ``"latest"``.
      batch_size: rows per step (default: the run's); the numbers do not depend on it.
      num_devices: local devices that share each step; the numbers do not depend on it.
      parallel: how they share it, ``"sharded"`` or ``"pmap"`` (:mod:`han_jax.training.devices`).
      data_overrides: ``DataConfig`` fields to change (default: the run's own data).
      out: where to write ``{split: {metric: value}}`` JSON.
      force: write ``out`` even where it is one of a run folder's own files.

    Returns:
      ``{split: metrics}``.
    """
    if out:
        check_output_file(out, "--out", force=force)
    config, saved = read_run_config(run_dir)
    if data_overrides:
        config = config.replace(data=dataclasses.replace(config.data, **data_overrides))
    for line in saved_data_paths(run_dir, config.data, data_overrides):
        log(line)
    batch_size = config.train.batch_size if batch_size is None else batch_size
    check_batch(batch_size, num_devices, field="--batch-size", devices=f"--devices={num_devices}")
    datasets, resolved = prepare(config)
    if (resolved.daily_sources, resolved.monthly_sources) != (saved.daily_sources, saved.monthly_sources):
        raise ConfigError(f"{run_dir}: the data's source layout {resolved.daily_sources} / {resolved.monthly_sources} "
                          f"differs from the run's {saved.daily_sources} / {saved.monthly_sources}")
    spec = StepSpec.of(config, saved)
    devices = make_devices(num_devices, parallel)
    prefetch(devices.compiled(spec).test)  # a warm start loads it while the checkpoint is read
    state = devices.put_state(load_checkpoint(run_dir, checkpoint, spec, config.data.daily_seq_len,
                                              config.data.monthly_seq_len))
    final = score_splits(state, datasets, spec, batch_size, devices=devices)
    log(metrics_table(final, spec.objective.tasks,
                      title=f"{run_dir} ({checkpoint} checkpoint, batch size {batch_size}, {num_devices} device(s), "
                            f"{devices.kind}): exact split metrics"))
    if out:
        write_json(out, final)
    return final
