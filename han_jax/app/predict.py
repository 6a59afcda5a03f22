"""Per-anchor predictions in the data's units: the table, ``predictions.csv``, ``forecast.png``, ``han-jax predict``.

One row per anchor day (the last day of an input window). Columns, in order: ``date`` (the
anchor), ``split`` (only in a training run's table), ``forecast_month`` (the month the
forecast columns are for: the anchor's month + ``prediction_horizon``), then each task's
columns in registry order (:meth:`han_jax.tasks.Task.columns`): regime probabilities and
class, the transition probability, the expected fatalities with the ZINB parameters, the
anomaly score, the next month of every monthly feature in the data's units and, with the
direct daily head, its days t+1..t+H; each beside ``actual/...``, the data's value.

What is not reported, because the model does not predict it: the daily features' next
month (the forecast head covers the monthly sources' columns only) and, with the default
latent daily head, any daily feature. Missing values (an actual the data does not have) are
NaN in the table and empty in the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from han_jax.app.run_folder import FORECAST_PLOT, PREDICTIONS_FILE, check_output_file, saved_data_paths
from han_jax.app.runs import Run, load_run
from han_jax.core.files import atomic_write
from han_jax.data import DataLayout, InferenceWindows, Normalisation, SplitData, iterate_batches
from han_jax.data.pipeline import parse_day
from han_jax.tasks import TableContext
from han_jax.training.devices import SingleDevice
from han_jax.training.spec import StepSpec

# The default folder of predict's files, inside the run folder beside (never over) what train wrote.
PREDICT_DIR = "predict"


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


def prediction_table(predictions: Mapping[str, np.ndarray], split: SplitData, dates: np.ndarray, *,
                     spec: StepSpec, normalisation: Normalisation, layout: DataLayout, prediction_horizon: int = 1,
                     split_name: Optional[str] = None) -> PredictionTable:
    """The table of one split's rows: ``date``, ``split``, ``forecast_month``, then every task's columns.

    Args:
      predictions: :func:`han_jax.training.steps.row_predictions` of the split's rows, in order (padding dropped).
      split: the rows' data (their targets are the ``actual/...`` columns).
      dates: datetime64[D] ``[N]``, the anchor days.
      spec: the run's step specification (its tasks, model and loss options).
      normalisation: the run's normalisation (to undo it).
      layout: the run's layout (the features' names).
      prediction_horizon: months between the anchor's month and the forecast month.
      split_name: adds a ``split`` column with this value.
    """
    n = len(split)
    cols: Dict[str, np.ndarray] = {"date": np.asarray(dates, "datetime64[D]")}
    if split_name is not None:
        cols["split"] = np.full(n, split_name)
    cols["forecast_month"] = (cols["date"].astype("datetime64[M]") + prediction_horizon).astype("datetime64[D]")
    ctx = TableContext(model=spec.model, loss=spec.objective.loss, normalisation=normalisation, layout=layout,
                       prediction_horizon=prediction_horizon)
    for task in spec.objective.tasks:
        cols.update(task.columns(predictions, split.targets, ctx))
    return PredictionTable(cols)


def concat_tables(tables: Sequence[PredictionTable]) -> PredictionTable:
    """The rows of several tables with the same columns, in order."""
    names = list(tables[0].columns)
    return PredictionTable({k: np.concatenate([t.columns[k] for t in tables]) for k in names})


def predict_windows(run: Run, windows: InferenceWindows, *, batch_size: Optional[int] = None) -> PredictionTable:
    """The run's predictions for every anchor of ``windows``: the test step's, the shared path with dropout off.

    The windows' targets are whatever the data has (missing ones masked); the predictions do not read them.

    Args:
      run: the loaded run.
      windows: ``run.windows(...)`` (the run's normalisation applied).
      batch_size: rows per step (default the run's); no number depends on it.
    """
    predictions = window_predictions(run, windows.split, batch_size=batch_size)
    return prediction_table(predictions, windows.split, windows.dates, spec=run.spec, normalisation=run.normalisation,
                            layout=run.layout, prediction_horizon=run.config.data.prediction_horizon)


def window_predictions(run: Run, split: SplitData, *, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Every task's per-row predictions (:meth:`han_jax.tasks.Task.predict`) for a split's rows, in order.

    The test step's, the shared path with dropout off; ``batch_size`` (default the run's) changes no number.
    """
    batch_size = batch_size or run.config.train.batch_size
    test = SingleDevice().compiled(run.spec).test
    rows = []
    for inputs, targets in iterate_batches(split, batch_size):
        p = jax.device_get(test(run.state, inputs, targets).predictions)
        keep = np.asarray(p.pop("sample_mask"), bool)
        rows.append({k: np.asarray(v)[keep] for k, v in p.items()})
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def predict(run: Run, world=None, *, data=None, date_from=None, date_to=None,
            batch_size: Optional[int] = None) -> PredictionTable:
    """One row per anchor of (new) data: the run's predictions in the data's units.

    Arguments as :meth:`han_jax.app.runs.Run.windows`; ``batch_size`` default the run's.
    """
    windows = run.windows(world, data=data, date_from=date_from, date_to=date_to)
    return predict_windows(run, windows, batch_size=batch_size)


def plot_forecast(table: PredictionTable, path: str, tasks: Sequence, *, title: str = "") -> None:
    """``forecast.png``: one panel per task panel (regime probabilities with the true class shaded, expected
    fatalities, a few monthly features' next month), predicted against actual where the table has actual values;
    a training table's split boundaries are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [draw for task in tasks for draw in task.panels(table.columns)]
    dates = table["date"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    marker = "o" if len(table) < 40 else None
    for ax, draw in zip(axes, panels):
        draw(ax, table.columns, dates, marker)
    if "split" in table.columns:
        splits = table["split"]
        for i in np.flatnonzero(splits[1:] != splits[:-1]) + 1:
            for ax in axes:
                ax.axvline(dates[i], color="grey", ls="--", lw=0.8)
            axes[0].text(dates[i], axes[0].get_ylim()[1], f" {splits[i]}", va="top", fontsize=8, color="grey")
    axes[-1].set_xlabel("anchor day (each forecast is made there, for the next month)")
    fig.autofmt_xdate()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), binary=True)
    plt.close(fig)


def predict_run(run_dir: str, *, checkpoint: str = "best", data_overrides: Optional[dict] = None, date_from=None,
                date_to=None, out: Optional[str] = None, plot: Optional[str] = None,
                batch_size: Optional[int] = None, force: bool = False, log=print) -> PredictionTable:
    """``han-jax predict``: a saved run's predictions for every anchor in a date range of (new) data.

    The inputs are normalised with the run's saved statistics, never refitted;
    anchors need only their input window, so data newer than the training data
    is the normal case.

    Args:
      run_dir: a folder written by ``han-jax train``.
      checkpoint: ``"best"`` or ``"latest"``.
      data_overrides: ``DataConfig`` fields saying where the data is (default: the run's own data).
      date_from, date_to: the anchor range (``YYYY-MM-DD``); default the data's last day.
      out: the CSV to write (default ``RUN/predict/predictions.csv``: beside the run's
        files, never over them).
      plot: the picture to write (default ``forecast.png`` beside ``out``).
      batch_size: rows per forward call (default the run's).
      force: write ``out`` or ``plot`` even where it is one of a run folder's own files.

    Returns:
      The :class:`PredictionTable` written.
    """
    # Cheap checks first: a typo should not wait for the checkpoint and the data.
    for value, name in ((date_from, "--from"), (date_to, "--to")):
        if value is not None:
            parse_day(value, name)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected at least 1")
    out = out or os.path.join(run_dir, PREDICT_DIR, PREDICTIONS_FILE)
    plot = plot or os.path.join(os.path.dirname(os.path.abspath(out)), FORECAST_PLOT)
    check_output_file(out, "--out", force=force)
    check_output_file(plot, "--plot", force=force)
    run = load_run(run_dir, checkpoint)
    data = dataclasses.replace(run.config.data, **(data_overrides or {}))
    for line in saved_data_paths(run_dir, data, data_overrides):
        log(line)
    windows = run.windows(data=data, date_from=date_from, date_to=date_to)
    for line in windows.report:
        log(f"data: {line}")
    table = predict_windows(run, windows, batch_size=batch_size)
    table.write_csv(out)
    tasks = run.spec.objective.tasks
    plot_forecast(table, plot, tasks, title=f"{run_dir} ({checkpoint} checkpoint): {len(table)} anchor(s) "
                                            f"{table['date'][0]}..{table['date'][-1]}")
    log(f"wrote {out} ({len(table)} rows, {len(table.columns)} columns) and {plot}")
    log(describe_row(table, -1, tasks))
    return table


def describe_row(table: PredictionTable, i: int, tasks: Sequence) -> str:
    """A few readable lines for one row: every task's fragment on the first line, then their extra lines."""
    inline, lines = [], []
    for task in tasks:
        fragment, extra = task.describe(table.columns, i)
        if fragment:
            inline.append(fragment)
        lines += extra
    return "\n".join([f"{table['date'][i]}: " + "; ".join(inline)] + lines)
