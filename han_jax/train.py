"""The training loop: data, model, state, epochs, early stopping, orbax checkpoints, reports.

Every phase runs through the steps of :mod:`han_jax.steps` and every epoch
metric through :class:`~han_jax.metrics.MetricAccumulator`, so train,
validation and test report the same keys, computed the same way. The test
split is also scored every epoch, for the plot only: model selection reads
validation alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.config import AggregateConfig, LossConfig, ModelConfig, OptimConfig, RegularizationConfig, TASK_NAMES
from han_jax.data import DataConfig, build_datasets, iterate_batches, make_world, num_batches
from han_jax.metrics import MetricAccumulator
from han_jax.precision import Policy
from han_jax.steps import StepConfig, TrainState, create_train_state, jit_steps, pmap_steps, reset_accumulation

COLLAPSE_THRESHOLD = 1e-3
COLLAPSE_TASKS = ("regime", "anomaly", "forecast")  # the tasks the original watched


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings (the original's CLI defaults)."""

    epochs: int = 200
    batch_size: int = 8
    patience: int = 30
    seed: int = 42
    num_devices: int = 1  # >1: pmap over that many local devices
    score_test_each_epoch: bool = True  # for the comparability plot; never used for selection


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run: one frozen tree, printed at start and saved in the run folder."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    aggregate: AggregateConfig = AggregateConfig()
    optim: OptimConfig = OptimConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    policy: str = "f32"
    train: TrainConfig = TrainConfig()

    @classmethod
    def small(cls) -> "Config":
        """The README's main job: the embedded synthetic world, a small model, a few minutes on 2 CPU cores."""
        return cls(
            model=ModelConfig(d_model=32, nhead=4, num_daily_layers=1, num_monthly_layers=1, num_fusion_layers=1,
                              num_temporal_layers=1),
            data=DataConfig(daily_seq_len=90, monthly_seq_len=4),
            optim=OptimConfig(learning_rate=1e-3, warmup_epochs=1, accumulation_steps=1),
            train=TrainConfig(epochs=6, batch_size=16, patience=30),
        )

    @classmethod
    def tiny(cls) -> "Config":
        """Tests: the small data preset and the smallest model."""
        return cls(
            model=ModelConfig.small(d_model=16, nhead=2),
            data=DataConfig.small(),
            optim=OptimConfig(learning_rate=1e-3, warmup_epochs=1, accumulation_steps=1),
            train=TrainConfig(epochs=2, batch_size=8, patience=30),
        )


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def step_config(config: Config, model_config: ModelConfig, steps_per_epoch: int) -> StepConfig:
    optim = dataclasses.replace(config.optim, num_epochs=config.train.epochs, steps_per_epoch=steps_per_epoch)
    return StepConfig(
        model=model_config,
        policy=Policy.from_string(config.policy),
        loss=config.loss,
        aggregate=config.aggregate,
        optim=optim,
        regularization=config.regularization,
    )


class _Checkpoints:
    """Latest and best train states with orbax, plus the loop's JSON metadata."""

    def __init__(self, run_dir: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # Synchronous saves: the loop waits for each save anyway (exact resume needs it on disk).
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints", "latest")), options=opts)
        self.best = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints", "best")), options=opts)

    def save(self, manager, epoch: int, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def restore(self, manager, template: TrainState):
        ocp = self._ocp
        step = manager.latest_step()
        if step is None:
            return None, None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
        # orbax hands back device-committed arrays; a fresh state is uncommitted, and jit
        # keys its cache on that, so a resumed run would recompile every step. Hand back
        # uncommitted arrays, exactly as create_train_state does.
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), out.state)
        return state, out.meta

    def close(self):
        self.latest.close()
        self.best.close()


def replicate(tree, n):
    """One copy per device, laid out as pmap's own outputs are.

    Broadcasting alone leaves the copies on one device; pmap would then see its
    sharded output as a new kind of input on the second step and compile again.
    """
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)
    return jax.pmap(lambda x: x)(stacked)


def _unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _start_epoch(state: TrainState, epoch: int, replicated: bool) -> TrainState:
    """Sets the schedule's epoch and drops a partial accumulation (the original's zero_grad)."""
    if replicated:
        return _pmapped_start_epoch(state, jnp.full((state.epoch.shape[0],), epoch, jnp.int32))
    return _jitted_start_epoch(state, jnp.int32(epoch))


def _set_epoch(state: TrainState, epoch) -> TrainState:
    return reset_accumulation(state.replace(epoch=jnp.full_like(state.epoch, epoch)))


_jitted_start_epoch = jax.jit(_set_epoch)
_pmapped_start_epoch = jax.pmap(_set_epoch)


def run_phase(step_fn, state, split, batch_size: int, *, num_devices: int, shuffle=False, seed=0, epoch=0,
              progress=None, train: bool = False):
    """One pass over a split; returns (state, epoch metrics, wall seconds)."""
    acc = MetricAccumulator()
    n_dev = num_devices if num_devices > 1 else None
    start = time.perf_counter()
    for inputs, targets in iterate_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                           num_devices=n_dev):
        if train:
            state, metrics = step_fn(state, inputs, targets)
        else:
            metrics = step_fn(state, inputs, targets)
            if isinstance(metrics, tuple):
                metrics = metrics[0]
        acc.update(metrics, device_axis=n_dev is not None)
        if progress is not None:
            progress.update(1)
            m = metrics if n_dev is None else jax.tree_util.tree_map(lambda x: x[0], metrics)
            progress.set_postfix(loss=f"{float(m['weighted_total']):.4f}")
    return state, acc.result(), time.perf_counter() - start


def _epoch_line(epoch, train_m, val_m, best_marker) -> str:
    raw = ", ".join(f"{t}:{train_m.get(f'loss/{t}', float('nan')):.4f}" for t in TASK_NAMES if f"loss/{t}" in train_m)
    weights = ", ".join(f"{t}:{train_m.get(f'weight/{t}', float('nan')):.3f}" for t in TASK_NAMES if f"weight/{t}" in train_m)
    return (
        f"Epoch {epoch:3d}: train_loss={train_m['weighted_total']:.4f}, val_loss={val_m['weighted_total']:.4f} "
        f"(simple: train={train_m['simple_total']:.4f}, val={val_m['simple_total']:.4f}), lr={train_m.get('learning_rate', 0):.2e}\n"
        f"    raw_losses=[{raw}]\n    weights=[{weights}]{' *' if best_marker else ''}"
    )


def prepare(config: Config, log=None):
    """Builds the datasets and the step configuration (model layout from the data)."""
    datasets = build_datasets(make_world(config.data), config.data)
    if log is not None:
        for line in datasets.report:
            log(f"data: {line}")
    model_config = dataclasses.replace(config.model, **datasets.model_layout())
    n_train_batches = num_batches(datasets.train, config.train.batch_size)
    steps_per_epoch = max(1, n_train_batches // config.optim.accumulation_steps)
    scfg = step_config(config, model_config, steps_per_epoch)
    if log is not None:
        log(f"data: train/val/test anchors {len(datasets.train)}/{len(datasets.val)}/{len(datasets.test)}; "
            f"daily {model_config.daily_sources}; monthly {model_config.monthly_sources}")
    return datasets, scfg


def train(config: Config, run_dir: str, *, resume: bool = False, quiet: bool = False, log=print,
          stop_after_epoch: Optional[int] = None) -> dict:
    """Trains, early-stops on validation ``weighted_total``, scores the best state on every split.

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch and phase,
    the same keys in every phase), ``summary.json`` and ``curves.png`` into
    ``run_dir``; checkpoints go to ``run_dir/checkpoints/{latest,best}``.
    """
    os.makedirs(run_dir, exist_ok=True)
    tc = config.train
    log(f"han-jax config:\n{json.dumps(config_to_dict(config), indent=1)}")
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f, indent=1)

    datasets, scfg = prepare(config, log=log)
    model_config = scfg.model
    n_train_batches = num_batches(datasets.train, tc.batch_size)
    sample_inputs, _ = next(iterate_batches(datasets.train, tc.batch_size))
    state = create_train_state(jax.random.PRNGKey(tc.seed), scfg, sample_inputs)
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    log(f"model: {n_params:,} parameters; policy {scfg.policy.name}; devices {tc.num_devices}")

    ckpt = _Checkpoints(run_dir)
    history, best_val, best_epoch, bad_epochs, start_epoch = [], math.inf, -1, 0, 0
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume:
        restored, meta = ckpt.restore(ckpt.latest, state)
        if restored is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {os.path.join(run_dir, 'checkpoints', 'latest')}")
        state = restored
        best_val, best_epoch, bad_epochs = meta["best_val"], meta["best_epoch"], meta["bad_epochs"]
        start_epoch = meta["epoch"] + 1
        history = meta["history"]
        log(f"resumed from epoch {meta['epoch']} (best val {best_val:.4f} at epoch {best_epoch})")
        _rewrite_metrics(metrics_path, upto_epoch=meta["epoch"])
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    steps = pmap_steps(scfg) if tc.num_devices > 1 else jit_steps(scfg)
    if tc.num_devices > 1:
        state = replicate(state, tc.num_devices)
    to_host = _unreplicate if tc.num_devices > 1 else (lambda s: s)

    from tqdm import tqdm

    for epoch in range(start_epoch, tc.epochs):
        state = _start_epoch(state, epoch, tc.num_devices > 1)
        bar = tqdm(total=n_train_batches, desc=f"epoch {epoch}", disable=quiet, leave=False, file=sys.stderr)
        state, train_m, secs = run_phase(steps.train, state, datasets.train, tc.batch_size, num_devices=tc.num_devices,
                                         shuffle=True, seed=tc.seed, epoch=epoch, progress=bar, train=True)
        bar.close()
        train_m["samples_per_second"] = train_m["n_rows"] / secs
        _, val_m, _ = run_phase(steps.eval, state, datasets.val, tc.batch_size, num_devices=tc.num_devices)
        phases = {"train": train_m, "val": val_m}
        if tc.score_test_each_epoch:
            _, phases["test"], _ = run_phase(steps.eval, state, datasets.test, tc.batch_size,
                                             num_devices=tc.num_devices)
        improved = val_m["weighted_total"] < best_val
        if improved:
            best_val, best_epoch, bad_epochs = val_m["weighted_total"], epoch, 0
        else:
            bad_epochs += 1
        log(_epoch_line(epoch, train_m, val_m, improved))
        collapsed = [f"{t}={train_m[f'loss/{t}']:.6f}" for t in COLLAPSE_TASKS
                     if f"loss/{t}" in train_m and train_m[f"loss/{t}"] < COLLAPSE_THRESHOLD]
        if collapsed:
            log(f"    COLLAPSE WARNING: task losses below {COLLAPSE_THRESHOLD}: {', '.join(collapsed)}")
        with open(metrics_path, "a") as f:
            for phase, m in phases.items():
                shared = {k: v for k, v in m.items() if k in val_m}
                extra = {k: v for k, v in m.items() if k not in val_m}
                f.write(json.dumps({"epoch": epoch, "phase": phase, "metrics": shared, "extra": extra}) + "\n")
        history.append({"epoch": epoch, **{p: {"weighted_total": m["weighted_total"], "simple_total": m["simple_total"]}
                                           for p, m in phases.items()}})
        meta = {"epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": history}
        host_state = to_host(state)
        ckpt.save(ckpt.latest, epoch, host_state, meta)
        if improved:
            ckpt.save(ckpt.best, epoch, host_state, meta)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            log(f"stopping after epoch {epoch} as asked; continue with --resume")
            ckpt.close()
            return {"stopped_after_epoch": epoch}
        if bad_epochs >= tc.patience:
            log(f"early stopping at epoch {epoch}: no val improvement for {tc.patience} epochs")
            break

    log(f"Training complete. Best val weighted_total {best_val:.4f} at epoch {best_epoch}")
    best_state, _ = ckpt.restore(ckpt.best, to_host(state))
    ckpt.close()
    final = evaluate_splits(best_state, datasets, scfg, tc.batch_size)
    summary = {
        "config": config_to_dict(config),
        "n_params": n_params,
        "best_epoch": best_epoch,
        "best_val_weighted_total": best_val,
        "final": final,
        "dataset_sizes": {"train": len(datasets.train), "val": len(datasets.val), "test": len(datasets.test)},
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(final_table(final))
    plot_curves(metrics_path, os.path.join(run_dir, "curves.png"))
    return summary


def evaluate_splits(state: TrainState, datasets, scfg: StepConfig, batch_size: int) -> dict:
    """Scores one state on train, val and test with the same (test) step: comparable numbers."""
    steps = jit_steps(scfg)
    out = {}
    for name in ("train", "val", "test"):
        _, out[name], _ = run_phase(steps.test, state, getattr(datasets, name), batch_size, num_devices=1)
    return out


def final_table(final: dict) -> str:
    keys = ["weighted_total", "simple_total", "data_term", "uncertainty_term", "reg_term"]
    keys += [f"loss/{t}" for t in TASK_NAMES if f"loss/{t}" in final["val"]]
    keys += ["regime_accuracy", "regime_balanced_accuracy", "casualty_mae", "anomaly_mse", "forecast_mse", "n_rows"]
    lines = [f"{'metric':28s} {'train':>12s} {'val':>12s} {'test':>12s}"]
    for k in keys:
        cells = [final[p].get(k) for p in ("train", "val", "test")]
        lines.append(f"{k:28s} " + " ".join(f"{'n/a':>12s}" if v is None else f"{v:12.4f}" for v in cells))
    return "Final metrics (best checkpoint, one shared path for every split):\n" + "\n".join(lines)


def _rewrite_metrics(path: str, upto_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if json.loads(l)["epoch"] <= upto_epoch]
    with open(path, "w") as f:
        f.writelines(lines)


def plot_curves(metrics_path: str, out_path: str) -> None:
    """Train/val/test weighted and simple totals per epoch, plus raw task losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(metrics_path)]
    phases = sorted({r["phase"] for r in rows}, key=["train", "val", "test"].index)
    tasks = [t for t in TASK_NAMES if any(f"loss/{t}" in r["metrics"] for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = {"train": "-", "val": "--", "test": ":"}
    for phase in phases:
        pr = [r for r in rows if r["phase"] == phase]
        ep = [r["epoch"] for r in pr]
        axes[0].plot(ep, [r["metrics"]["weighted_total"] for r in pr], styles[phase], marker="o", label=phase)
        axes[1].plot(ep, [r["metrics"]["simple_total"] for r in pr], styles[phase], marker="o", label=phase)
        for i, t in enumerate(tasks):
            axes[2].plot(ep, [r["metrics"][f"loss/{t}"] for r in pr], styles[phase], color=f"C{i}",
                         label=t if phase == "train" else None)
    axes[0].set_title("weighted_total (Kendall), every phase")
    axes[1].set_title("simple_total (plain mean), every phase")
    axes[2].set_title("raw task losses (- train, -- val, : test)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
