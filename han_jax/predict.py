"""Per-anchor predictions in the data's units: the table, ``predictions.csv``, ``forecast.png``, ``han-jax predict``.

One row per anchor day (the last day of an input window). Columns, in order:

* ``date`` (the anchor), ``split`` (only in a training run's table), ``forecast_month``
  (the month the forecast columns are for: the anchor's month + ``prediction_horizon``);
* ``regime_prob/<k>`` for every regime class, ``regime_class`` (the most probable) and
  ``actual/regime_class`` (the anchor day's phase as a class);
* ``transition_prob``: the sigmoid of the anomaly head's logit, which the original uses as
  its transition logit (it has no transition head, ``docs/model.md``), and ``actual/transition``;
* ``expected_fatalities = (1 - zinb_pi) * zinb_mu * casualty_target_scale`` (fatalities of the
  anchor's month, as the casualty metrics form it), the ZINB ``zinb_pi``, ``zinb_mu`` (in units of
  ``casualty_target_scale`` fatalities, the scale the model works in) and ``zinb_theta``, and
  ``actual/fatalities``;
* ``anomaly_score`` (the anomaly head's last-month output, a z-score) and ``actual/anomaly``;
* ``forecast/<source>/<feature>`` and ``actual/<source>/<feature>`` for every feature of every
  monthly source: the next-month forecast and the data's value, in the data's original units
  (the saved train statistics' z-score undone; monthly sources are never count-transformed);
* ``daily_forecast/d<k>/<source>/<feature>``, only for a model with the direct daily head
  (``ModelConfig.use_latent_forecast=False``): its forecast of day t+k, z-score and count
  transform (signed log1p, invertible) undone, daily sources in sorted name order as its
  targets. Unless the run had ``data.daily_forecast_targets=True`` that head was trained by the
  original's tiny regulariser alone, and its numbers mean little.

What is not reported, because the model does not predict it: the daily features' next month.
The forecast head predicts the monthly sources' columns only (``forecast_pred [B, M,
n_monthly_features]``; :func:`han_jax.metrics.forecast_sources`); the forecast targets' daily
block (monthly means of the normalised daily features) has no prediction. The default latent
daily head (``use_latent_forecast=True``) predicts latent states, not features. Missing values
(an actual the data does not have) are NaN in the table and empty in the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from han_jax.baselines import regime_labels_np
from han_jax.config import Config
from han_jax.data import DataLayout, InferenceWindows, Normalisation, SplitData, iterate_batches
from han_jax.data.pipeline import parse_day
from han_jax.runs import Run, atomic_write, load_run
from han_jax.steps import row_predictions


@dataclasses.dataclass(frozen=True)
class PredictionTable:
    """Named columns of equal length (see the module docstring), in order.

    ``date`` and ``forecast_month`` are datetime64[D], ``split`` strings, every
    other column float64 with NaN where there is no value.
    """

    columns: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["date"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def write_csv(self, path: str) -> None:
        """One line per row, a header first; NaN as an empty cell; written atomically."""
        names = list(self.columns)

        def cell(value) -> str:
            if isinstance(value, (np.datetime64, str, np.str_)):
                return str(value)
            # 7 significant digits: the model computes in float32, whose precision that is.
            return "" if np.isnan(value) else f"{float(value):.7g}"

        def write(f):
            out = csv.writer(f, lineterminator="\n")
            out.writerow(names)
            for i in range(len(self)):
                out.writerow([cell(self.columns[n][i]) for n in names])

        atomic_write(path, write)


def forecast_features(layout: DataLayout) -> list:
    """``(source, feature)`` of the forecast head's columns: the monthly sources' features, in order."""
    return [(src, feat) for src, feats in layout.monthly for feat in feats]


def prediction_table(predictions: Mapping[str, np.ndarray], split: SplitData, dates: np.ndarray, *, config: Config,
                     normalisation: Normalisation, layout: DataLayout, split_name: Optional[str] = None
                     ) -> PredictionTable:
    """The table of one split's rows.

    Args:
      predictions: :func:`han_jax.steps.row_predictions` of the split's rows, in order (padding dropped).
      split: the rows' data (their targets are the ``actual/...`` columns).
      dates: datetime64[D] ``[N]``, the anchor days.
      config: the run's configuration.
      normalisation: the run's normalisation (to undo it).
      layout: the run's layout (the features' names).
      split_name: adds a ``split`` column with this value.

    Returns:
      The :class:`PredictionTable`.
    """
    n = len(split)
    tg = split.targets
    cols: Dict[str, np.ndarray] = {"date": np.asarray(dates, "datetime64[D]")}
    if split_name is not None:
        cols["split"] = np.full(n, split_name)
    cols["forecast_month"] = (cols["date"].astype("datetime64[M]")
                              + config.data.prediction_horizon).astype("datetime64[D]")

    def actual(values, valid):
        return np.where(np.asarray(valid, bool), np.asarray(values, np.float64), np.nan)

    probs = np.asarray(predictions["regime_probs"], np.float64)
    for k in range(probs.shape[1]):
        cols[f"regime_prob/{k}"] = probs[:, k]
    cols["regime_class"] = np.argmax(probs, axis=1).astype(np.float64)
    labels = regime_labels_np(tg["phase_index"], probs.shape[1], config.step.loss.phase_to_coarse)
    cols["actual/regime_class"] = actual(labels, tg["phase_valid"])
    cols["transition_prob"] = np.asarray(predictions["transition_prob"], np.float64)
    cols["actual/transition"] = actual(tg["is_transition"], tg["phase_valid"])
    for key in ("expected_fatalities", "zinb_pi", "zinb_mu", "zinb_theta"):
        cols[key] = np.asarray(predictions[key], np.float64)
    cols["actual/fatalities"] = actual(tg["fatalities"], tg["casualty_valid"])
    cols["anomaly_score"] = np.asarray(predictions["anomaly_logit"], np.float64)
    cols["actual/anomaly"] = actual(tg["anomaly"], tg["anomaly_valid"])

    # The next month: the head's last position, and the forecast targets' last position
    # (monthly block first, config order), both normalised.
    pred_z = np.asarray(predictions["forecast_next"], np.float64)
    true_z, true_ok = tg["forecast_targets"][:, -1], tg["forecast_masks"][:, -1]
    start = 0
    for src, feats in layout.monthly:
        block = slice(start, start + len(feats))
        pred = normalisation.to_original_units("monthly", src, pred_z[:, block])
        true = np.where(true_ok[:, block], normalisation.to_original_units("monthly", src, true_z[:, block]), np.nan)
        for j, feat in enumerate(feats):
            cols[f"forecast/{src}/{feat}"] = pred[:, j]
            cols[f"actual/{src}/{feat}"] = true[:, j]
        start += len(feats)

    if "daily_forecast" in predictions:
        daily = np.asarray(predictions["daily_forecast"], np.float64)  # [N, H, Fd], sorted source names
        features = layout.features("daily")
        start = 0
        for src in sorted(features):
            block = slice(start, start + len(features[src]))
            values = normalisation.to_original_units("daily", src, daily[:, :, block])
            for k in range(daily.shape[1]):
                for j, feat in enumerate(features[src]):
                    cols[f"daily_forecast/d{k + 1}/{src}/{feat}"] = values[:, k, j]
            start += len(features[src])
    return PredictionTable(cols)


def concat_tables(tables: Sequence[PredictionTable]) -> PredictionTable:
    """The rows of several tables with the same columns, in order."""
    names = list(tables[0].columns)
    return PredictionTable({k: np.concatenate([t.columns[k] for t in tables]) for k in names})


def predict_windows(run: Run, windows: InferenceWindows, *, batch_size: Optional[int] = None) -> PredictionTable:
    """The run's predictions for every anchor of ``windows`` (:meth:`han_jax.runs.Run.forward`, dropout off).

    Args:
      run: the loaded run.
      windows: ``run.windows(...)`` (the run's normalisation applied).
      batch_size: rows per forward call (default the run's); no number depends on it.
    """
    batch_size = batch_size or run.config.train.batch_size
    rows = []
    for inputs, targets in iterate_batches(windows.split, batch_size):
        p = jax.device_get(row_predictions(run.forward(inputs), run.config))
        keep = np.asarray(targets.sample_mask, bool)
        rows.append({k: np.asarray(v)[keep] for k, v in p.items()})
    predictions = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return prediction_table(predictions, windows.split, windows.dates, config=run.config,
                            normalisation=run.normalisation, layout=run.layout)


def plot_forecast(table: PredictionTable, path: str, *, title: str = "", max_features: int = 4) -> None:
    """``forecast.png``: regime probabilities over the anchors with the true class shaded, and predicted vs
    actual expected fatalities and next-month values of a few monthly features (the first of each source).

    Actual values appear where the table has them; a training table's split boundaries are marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dates = table["date"]
    features = [k[len("forecast/"):] for k in table.columns if k.startswith("forecast/")]
    firsts = list(dict.fromkeys(f.split("/")[0] for f in features))
    chosen = [next(f for f in features if f.startswith(f"{s}/")) for s in firsts][:max_features]
    chosen += [f for f in features if f not in chosen][:max(0, max_features - len(chosen))]
    n_classes = sum(k.startswith("regime_prob/") for k in table.columns)
    fig, axes = plt.subplots(2 + len(chosen), 1, figsize=(11, 2.3 * (2 + len(chosen))), sharex=True, squeeze=False)
    axes = axes[:, 0]
    marker = "o" if len(table) < 40 else None

    true = table["actual/regime_class"]
    # Shade each run of days with one true class (NaN: no label there).
    start = 0
    for i in range(1, len(table) + 1):
        if i == len(table) or not (true[i] == true[start] or (np.isnan(true[i]) and np.isnan(true[start]))):
            if not np.isnan(true[start]):
                axes[0].axvspan(dates[start], dates[i - 1] + np.timedelta64(1, "D"), color=f"C{int(true[start])}",
                                alpha=0.15, lw=0)
            start = i
    for k in range(n_classes):
        axes[0].plot(dates, table[f"regime_prob/{k}"], color=f"C{k}", marker=marker, ms=3, label=f"class {k}")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("regime probabilities (shaded: the true class)")
    axes[0].legend(fontsize=7, ncol=n_classes, loc="upper left")

    panels = [("expected_fatalities", "actual/fatalities", "fatalities of the anchor's month")]
    panels += [(f"forecast/{f}", f"actual/{f}", f"{f}, next month (original units)") for f in chosen]
    for ax, (pred, act, label) in zip(axes[1:], panels):
        ax.plot(dates, table[pred], color="C0", marker=marker, ms=3, label="predicted")
        if np.any(~np.isnan(table[act])):
            ax.plot(dates, table[act], color="k", lw=1, marker=marker, ms=3, label="actual")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if "split" in table.columns:
        splits = table["split"]
        for i in np.flatnonzero(splits[1:] != splits[:-1]) + 1:
            for ax in axes:
                ax.axvline(dates[i], color="grey", ls="--", lw=0.8)
            axes[0].text(dates[i], 1.0, f" {splits[i]}", va="top", fontsize=8, color="grey")
    axes[-1].set_xlabel("anchor day (each forecast is made there, for the next month)")
    fig.autofmt_xdate()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), binary=True)
    plt.close(fig)


def predict_run(run_dir: str, *, checkpoint: str = "best", data_overrides: Optional[dict] = None, date_from=None,
                date_to=None, out: str = "predictions.csv", plot: Optional[str] = None,
                batch_size: Optional[int] = None, log=print) -> PredictionTable:
    """``han-jax predict``: a saved run's predictions for every anchor in a date range of (new) data.

    The inputs are normalised with the run's saved statistics, never refitted;
    anchors need only their input window, so data newer than the training data
    is the normal case.

    Args:
      run_dir: a folder written by ``han-jax train``.
      checkpoint: ``"best"`` or ``"latest"``.
      data_overrides: ``DataConfig`` fields saying where the data is (default: the run's own data).
      date_from, date_to: the anchor range (``YYYY-MM-DD``); default the data's last day.
      out: the CSV to write.
      plot: the picture to write (default ``forecast.png`` beside ``out``).
      batch_size: rows per forward call (default the run's).

    Returns:
      The :class:`PredictionTable` written.
    """
    # Cheap checks first: a typo should not wait for the checkpoint and the data.
    for value, name in ((date_from, "--from"), (date_to, "--to")):
        if value is not None:
            parse_day(value, name)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected at least 1")
    run = load_run(run_dir, checkpoint)
    data = dataclasses.replace(run.config.data, **(data_overrides or {}))
    windows = run.windows(data=data, date_from=date_from, date_to=date_to)
    for line in windows.report:
        log(f"data: {line}")
    table = predict_windows(run, windows, batch_size=batch_size)
    plot = plot or os.path.join(os.path.dirname(os.path.abspath(out)), "forecast.png")
    table.write_csv(out)
    plot_forecast(table, plot, title=f"{run_dir} ({checkpoint} checkpoint): {len(table)} anchor(s) "
                                     f"{table['date'][0]}..{table['date'][-1]}")
    log(f"wrote {out} ({len(table)} rows, {len(table.columns)} columns) and {plot}")
    log(describe_row(table, -1))
    return table


def describe_row(table: PredictionTable, i: int) -> str:
    """A few readable lines for one row: regime, transition, fatalities, anomaly, next-month forecast."""
    c = table.columns
    probs = [c[k][i] for k in c if k.startswith("regime_prob/")]
    lines = [f"{c['date'][i]}: regime probabilities [{', '.join(f'{p:.3f}' for p in probs)}] "
             f"(class {int(c['regime_class'][i])}); transition {c['transition_prob'][i]:.3f}; expected fatalities "
             f"{c['expected_fatalities'][i]:.1f} (pi {c['zinb_pi'][i]:.3f}, mu {c['zinb_mu'][i]:.4g}, "
             f"theta {c['zinb_theta'][i]:.4g}); anomaly score {c['anomaly_score'][i]:.3f}"]
    by_source: Dict[str, list] = {}
    for k in c:
        if k.startswith("forecast/"):
            src, feat = k[len("forecast/"):].split("/", 1)
            by_source.setdefault(src, []).append(f"{feat} {c[k][i]:.4g}")
    month = str(c["forecast_month"][i])[:7]
    lines += [f"  {month} forecast, {src}: {', '.join(v)}" for src, v in by_source.items()]
    return "\n".join(lines)
