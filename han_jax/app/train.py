"""The training loop: data, model, state, epochs, early stopping, orbax checkpoints, reports.

Every phase runs through the steps of :mod:`han_jax.training.steps` and every epoch metric
through :mod:`han_jax.training.accumulate`, so train, validation and test report the same
keys, computed the same way. With ``train.score_test_each_epoch`` (the default) the test
split is also scored every epoch, for the plot only: model selection reads validation alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
from tqdm import tqdm

from han_jax.app.evaluate import (
    evaluate_split,
    fallback_tasks,
    metrics_table,
    score_splits,
    split_baselines,
    with_baselines,
)
from han_jax.app.predict import concat_tables, plot_forecast, prediction_table
from han_jax.app.run_folder import (
    CONFIG_FILE,
    CURVES_PLOT,
    FORECAST_PLOT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    check_resume_config,
    lock_run_dir,
    read_run_config,
    write_run_description,
)
from han_jax.app.runs import prepare
from han_jax.app.summaries import open_writer, write_scalars
from han_jax.app.validation import validate_config
from han_jax.config import Config, ConfigError, config_to_dict
from han_jax.core.files import append_text, atomic_write, json_safe, non_finite_keys, write_json
from han_jax.data import iterate_batches, num_batches
from han_jax.tasks import loss_key, targets_key
from han_jax.training.accumulate import EpochAccumulator
from han_jax.training.checkpoints import CHECKPOINTS, CHECKPOINTS_DIR, Checkpoints, checkpoint_epoch, load_checkpoint
from han_jax.training.devices import Devices, make_devices
from han_jax.training.distributed import is_primary
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import create_train_state

COLLAPSE_THRESHOLD = 1e-3


def collapse_warning(metrics: dict, tasks) -> Optional[str]:
    """The original's collapse warning, for the tasks it watched (``Task.watch_collapse``) that had targets.

    A task without any target row is scored by the original's tiny fallback
    regulariser, small by design: its loss says nothing about collapse.
    """
    collapsed = [f"{t.name}={metrics[f'loss/{t.name}']:.6f}" for t in tasks
                 if t.watch_collapse and loss_key(t.name) in metrics
                 and (metrics.get(targets_key(t.name)) or 0) > 0 and metrics[loss_key(t.name)] < COLLAPSE_THRESHOLD]
    return f"COLLAPSE WARNING: task losses below {COLLAPSE_THRESHOLD}: {', '.join(collapsed)}" if collapsed else None


def train_epoch(steps, state, split, batch_size: int, *, spec: StepSpec, devices: Devices, seed: int, epoch: int,
                progress=None):
    """One shuffled pass of the train step over the training split.

    Returns:
      (state, metrics, wall seconds): :class:`~han_jax.training.accumulate.EpochAccumulator`'s
      numbers, the exact metrics of the train steps' statistics with the losses and totals
      as row-weighted means of the per-batch values (what training optimises, as in the
      original).
    """
    acc = EpochAccumulator()
    start = time.perf_counter()
    for inputs, targets in devices.batches(split, batch_size, shuffle=True, seed=seed, epoch=epoch):
        state, out = steps.train(state, inputs, targets)
        acc.update(out.metrics, out.statistics, device_axis=devices.device_axis)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(devices.first(out.metrics)['weighted_total']):.4f}")
    return state, acc.result(devices.first(state.log_vars), spec.objective), time.perf_counter() - start


class NoFiniteValidation(RuntimeError):
    """Training ended without one epoch whose validation total was finite: nothing to select or score."""


def _epoch_line(epoch, train_m, val_m, best_marker, tasks) -> str:
    names = [t.name for t in tasks]
    raw = ", ".join(f"{t}:{train_m[loss_key(t)]:.4f}" for t in names if loss_key(t) in train_m)
    weights = ", ".join(f"{t}:{train_m[f'weight/{t}']:.3f}" for t in names if f"weight/{t}" in train_m)
    return (
        f"Epoch {epoch:3d}: train_loss={train_m['weighted_total']:.4f}, val_loss={val_m['weighted_total']:.4f} "
        f"(simple: train={train_m['simple_total']:.4f}, val={val_m['simple_total']:.4f}), "
        f"lr={train_m.get('learning_rate', 0):.2e}\n"
        f"    raw_losses=[{raw}]\n    weights=[{weights}]{' *' if best_marker else ''}"
    )


def train(config: Config, run_dir: str, *, resume: bool = False, resume_overrides: Sequence[str] = (),
          quiet: bool = False, log=print, stop_after_epoch: Optional[int] = None,
          init_from: Optional[str] = None, world=None) -> dict:
    """Trains, early-stops on validation ``weighted_total``, scores the best state on every split.

    Writes into ``run_dir``: ``config.json``, ``resolved.json``, ``norm_stats.npz`` and
    ``layout.json`` (what :func:`han_jax.app.runs.load_run` needs to predict on new data),
    ``metrics.jsonl`` (one line per epoch and phase, the same keys in every phase),
    ``tensorboard/`` (the same scalars, when tensorboardX is installed and
    ``TrainConfig.tensorboard`` is on), ``summary.json``, ``curves.png``, and from the final
    scoring of the best checkpoint ``predictions.csv`` (every split's rows,
    :mod:`han_jax.app.predict`) and ``forecast.png``; checkpoints go to
    ``run_dir/checkpoints/{latest,best}``. Every file but ``metrics.jsonl`` (appended an
    epoch at a time, cut back on resume) is replaced atomically.

    The run holds the folder's lock (:func:`han_jax.app.run_folder.lock_run_dir`) from before
    its first write to its end; another writer fails at once with ``RunLocked``. With
    ``resume``, the folder's ``config.json`` must match ``config`` but for the fields
    :func:`han_jax.app.run_folder.check_resume_config` allows and those named in
    ``resume_overrides``; the folder is not changed before that check passes. ``init_from``
    (a run folder of the same model) starts a new run from that run's best state instead of
    a fresh one (a warm refit of a backtest). ``world`` replaces the data ``config.data``
    names (a backtest's cut of it).
    """
    # Nothing is written and nothing compiled until the configuration and the data are known good: a bad
    # value fails here in one line (ConfigError / DataError), leaving no half-made run folder behind.
    validate_config(config)
    devices = make_devices(config.train.num_devices, config.train.parallel)
    # The devices' rows of a batch, checked now (one contiguous block per process), before the data is built.
    devices.process_rows(config.train.batch_size)
    # In a multi-process run process 0 writes the folder's files and holds its lock; the others only read it
    # and take part in the collective checkpoint saves.
    lock = lock_run_dir(run_dir, "han-jax train") if is_primary() else contextlib.nullcontext()
    with lock:
        return _train(config, run_dir, devices, resume=resume, resume_overrides=resume_overrides, quiet=quiet, log=log,
                      stop_after_epoch=stop_after_epoch, init_from=init_from, world=world)


def _train(config: Config, run_dir: str, devices: Devices, *, resume: bool, resume_overrides: Sequence[str],
           quiet: bool, log, stop_after_epoch: Optional[int], init_from: Optional[str] = None,
           world=None) -> dict:
    """:func:`train`'s body, run while holding the folder's lock."""
    tc = config.train
    latest_dir = os.path.join(run_dir, CHECKPOINTS_DIR, "latest")
    if resume and checkpoint_epoch(run_dir) is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {latest_dir}; expected a run that saved an "
                                "epoch (start this one again without --resume)")
    if not resume and any(checkpoint_epoch(run_dir, which) is not None for which in CHECKPOINTS):
        # orbax would skip every epoch up to the old run's and the final scoring would read its state.
        raise FileExistsError(f"{os.path.join(run_dir, CHECKPOINTS_DIR)}: holds another run's checkpoints; expected "
                              "--resume to continue it, or another --run-dir")
    primary = is_primary()
    if not primary:
        log = _silent
    if resume:
        saved, _ = read_run_config(run_dir)
        changed = check_resume_config(saved, config, resume_overrides, where=os.path.join(run_dir, CONFIG_FILE))
        if changed:
            log(f"resume: configuration changed in {', '.join(changed)}")
    log(f"han-jax config:\n{json.dumps(config_to_dict(config), indent=1)}")
    datasets, resolved = prepare(config, log=log, world=world)
    if tc.batch_size > len(datasets.train):
        # Every step would be mostly padding, and the evaluation batches of that size could not fit in memory.
        raise ConfigError(f"train.batch_size={tc.batch_size}: expected at most the {len(datasets.train)} training "
                          "anchors of this data")
    # What the user asked for, what the data gave, and how its inputs were made: the folder alone can predict.
    if primary:
        write_run_description(run_dir, config, resolved, datasets.normalisation, datasets.layout)
    spec = StepSpec.of(config, resolved)
    tasks = spec.objective.tasks
    n_train_batches = num_batches(datasets.train, tc.batch_size)
    sample_inputs, _ = next(iterate_batches(datasets.train, tc.batch_size))
    steps = devices.steps(spec, Schedule.of(config.step.optim, epochs=tc.epochs,
                                            steps_per_epoch=resolved.steps_per_epoch))
    # A warm start loads the stored steps in the background while the state is created.
    steps.prefetch("train", "start_epoch", "eval")
    state = create_train_state(jax.random.PRNGKey(tc.seed), spec, sample_inputs,
                               log_var_priors=config.step.log_var_priors)
    if init_from is not None and not resume:
        state = load_checkpoint(init_from, "best", spec, config.data.daily_seq_len, config.data.monthly_seq_len)
        log(f"state: continued from {init_from} (best checkpoint)")
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    processes = f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log(f"model: {n_params:,} parameters; policy {spec.policy.name}; devices {tc.num_devices} "
        f"({devices.kind}{processes})")

    ckpt = Checkpoints(run_dir, place=lambda s: devices.checkpoint_view(devices.put_state(s)))
    history, best_val, best_epoch, bad_epochs, start_epoch = [], math.inf, -1, 0, 0
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if resume:
        restored, meta = ckpt.resume(state, log=log)
        if restored is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {latest_dir}")
        state = restored
        best_val, best_epoch, bad_epochs = meta["best_val"], meta["best_epoch"], meta["bad_epochs"]
        start_epoch = meta["epoch"] + 1
        history = meta["history"]
        log(f"resumed from epoch {meta['epoch']} (best val {best_val:.4f} at epoch {best_epoch})")
        if primary:
            _rewrite_metrics(metrics_path, upto_epoch=meta["epoch"])
    elif primary and os.path.exists(metrics_path):
        os.remove(metrics_path)

    baselines = split_baselines(datasets, spec)
    state = devices.put_state(state)

    # Flushed every epoch, so an interrupted run keeps its scalars; closed where the loop returns.
    writer = open_writer(run_dir, enabled=tc.tensorboard and primary, purge_from_epoch=start_epoch if resume else None,
                         log=log)
    for epoch in range(start_epoch, tc.epochs):
        state = steps.start_epoch(state, epoch)
        bar = tqdm(total=n_train_batches, desc=f"epoch {epoch}", disable=quiet or not primary, leave=False,
                   file=sys.stderr)
        state, train_m, secs = train_epoch(steps, state, datasets.train, tc.batch_size, spec=spec, devices=devices,
                                           seed=tc.seed, epoch=epoch, progress=bar)
        bar.close()
        train_m["samples_per_second"] = train_m["n_rows"] / secs
        phases = {"train": with_baselines(train_m, baselines["train"], tasks)}
        for name in ("val", "test") if tc.score_test_each_epoch else ("val",):
            m, _ = evaluate_split(steps.eval, state, getattr(datasets, name), tc.batch_size, spec=spec,
                                  devices=devices)
            phases[name] = with_baselines(m, baselines[name], tasks)
        train_m, val_m = phases["train"], phases["val"]
        improved = val_m["weighted_total"] < best_val
        if improved:
            best_val, best_epoch, bad_epochs = val_m["weighted_total"], epoch, 0
        else:
            bad_epochs += 1
        log(_epoch_line(epoch, train_m, val_m, improved, tasks))
        collapsed = collapse_warning(train_m, tasks)
        if collapsed:
            log(f"    {collapsed}")
        if epoch == start_epoch and fallback_tasks(train_m, tasks):
            log(f"    no targets (fallback regulariser only) for: {', '.join(fallback_tasks(train_m, tasks))}")
        lines = []
        for phase, m in phases.items():
            shared = {k: v for k, v in m.items() if k in val_m}
            extra = {k: v for k, v in m.items() if k not in val_m}
            lines.append(metrics_line(epoch, phase, shared, extra))
            write_scalars(writer, epoch, phase, m)
        if primary:
            append_text(metrics_path, "".join(lines))  # one write: a crash tears at most this epoch's last line
        if writer is not None:
            writer.flush()
        history.append({"epoch": epoch, **{p: {"weighted_total": m["weighted_total"], "simple_total": m["simple_total"]}
                                           for p, m in phases.items()}})
        meta = {"epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": history}
        saved_state = devices.checkpoint_view(state)
        ckpt.save(ckpt.latest, epoch, saved_state, meta)
        if improved:
            ckpt.save(ckpt.best, epoch, saved_state, meta)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            log(f"stopping after epoch {epoch} as asked; continue with --resume")
            ckpt.close()
            if writer is not None:
                writer.close()
            return {"stopped_after_epoch": epoch}
        if bad_epochs >= tc.patience:
            log(f"early stopping at epoch {epoch}: no val improvement for {tc.patience} epochs")
            break

    if best_epoch < 0:
        ckpt.close()
        if writer is not None:
            writer.close()
        if primary:
            write_json(os.path.join(run_dir, SUMMARY_FILE),
                       {"config": config_to_dict(config), "resolved": config_to_dict(resolved), "n_params": n_params,
                        "best_epoch": None, "best_val_weighted_total": None, "final": None})
        raise NoFiniteValidation(
            f"{run_dir}: no epoch had a finite validation weighted_total, so there is no best checkpoint to "
            "score; metrics.jsonl and checkpoints/latest are kept (a learning rate too high, "
            "step.optim.learning_rate, is the usual cause)")
    log(f"Training complete. Best val weighted_total {best_val:.4f} at epoch {best_epoch}")
    best_state, _ = ckpt.restore(ckpt.best, devices.local_state(state))
    ckpt.close()
    if writer is not None:
        writer.close()
    final, predictions = score_splits(devices.put_state(best_state), datasets, spec, tc.batch_size, devices=devices,
                                      baselines=baselines, predictions=True)
    summary = {
        "config": config_to_dict(config),
        "resolved": config_to_dict(resolved),
        "n_params": n_params,
        "best_epoch": best_epoch,
        "best_val_weighted_total": best_val,
        "final": final,
        "dataset_sizes": {"train": len(datasets.train), "val": len(datasets.val), "test": len(datasets.test)},
    }
    if not primary:
        return summary
    write_json(os.path.join(run_dir, SUMMARY_FILE), summary)
    log(metrics_table(final, tasks, title="Final metrics (best checkpoint, exact split metrics, one shared path for "
                                          "every split):"))
    plot_curves(metrics_path, os.path.join(run_dir, CURVES_PLOT), tasks)
    table = concat_tables([
        prediction_table(predictions[name], split, datasets.calendar.day_dates[split.anchors], spec=spec,
                         normalisation=datasets.normalisation, layout=datasets.layout,
                         prediction_horizon=config.data.prediction_horizon, split_name=name)
        for name, split in datasets.splits.items()])
    table.write_csv(os.path.join(run_dir, PREDICTIONS_FILE))
    plot_forecast(table, os.path.join(run_dir, FORECAST_PLOT), tasks,
                  title=f"{run_dir}: best checkpoint (epoch {best_epoch}) on every split")
    return summary


def _silent(*args, **kwargs) -> None:
    """The log of a process other than 0: process 0 reports for the run."""


def metrics_line(epoch: int, phase: str, metrics: dict, extra: dict) -> str:
    """One line of ``metrics.jsonl``: strict JSON, a non-finite value as null and its key in ``non_finite``.

    ``NaN`` and ``Infinity`` are not JSON, and a reader other than Python's would reject
    the whole file; the keys say which nulls were not a missing value but a non-finite one.
    """
    row = {"epoch": epoch, "phase": phase, "metrics": json_safe(metrics), "extra": json_safe(extra)}
    bad = non_finite_keys(metrics) + non_finite_keys(extra)
    if bad:
        row["non_finite"] = bad
    return json.dumps(row, allow_nan=False) + "\n"


def _rewrite_metrics(path: str, upto_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (they will be redone).

    A run killed after writing an epoch's lines but before its checkpoint was
    complete would otherwise report that epoch twice. The file is replaced
    atomically; a line that is not JSON (torn by a crash mid-append) is dropped.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [_parsed(line) for line in f]
    kept = [line for line, row in rows if row is not None and row["epoch"] <= upto_epoch]
    atomic_write(path, lambda f: f.writelines(kept))


def _parsed(line: str):
    """``(line, row)``; ``row`` is None when the line is not a whole JSON object."""
    try:
        return line, json.loads(line)
    except json.JSONDecodeError:
        return line, None


def plot_curves(metrics_path: str, out_path: str, tasks) -> None:
    """Train/val/test weighted and simple totals per epoch, plus raw task losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    phases = sorted({r["phase"] for r in rows}, key=["train", "val", "test"].index)
    tasks = [t.name for t in tasks if any(loss_key(t.name) in r["metrics"] for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = {"train": "-", "val": "--", "test": ":"}
    for phase in phases:
        pr = [r for r in rows if r["phase"] == phase]
        ep = [r["epoch"] for r in pr]
        axes[0].plot(ep, [r["metrics"]["weighted_total"] for r in pr], styles[phase], marker="o", label=phase)
        axes[1].plot(ep, [r["metrics"]["simple_total"] for r in pr], styles[phase], marker="o", label=phase)
        for i, t in enumerate(tasks):
            axes[2].plot(ep, [r["metrics"][loss_key(t)] for r in pr], styles[phase], color=f"C{i}",
                         label=t if phase == "train" else None)
    axes[0].set_title("weighted_total (Kendall), every phase")
    axes[1].set_title("simple_total (plain mean), every phase")
    axes[2].set_title("raw task losses (- train, -- val, : test)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=90), binary=True)
    plt.close(fig)
