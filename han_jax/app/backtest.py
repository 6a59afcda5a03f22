"""``han-jax backtest``: rolling-origin evaluation with proper scores against naive baselines.

At every origin (a month start) the data is cut to what was known that day
(:func:`han_jax.data.known_at`: every source before the origin, each monthly source at its
publication lag), a run is trained on it (its normalisation fitted on that run's training
window only) and the best state forecasts from the window that ends on the origin's last
known day. The forecast is scored on the month after the origin, as it happened, beside the
task's baselines fitted on the same window, by the task's one scoring function
(:meth:`han_jax.tasks.Task.proper_scores`):

* the forecast head's next month is the month after the origin;
* the regime, transition and casualty heads describe the last known day and month: their
  forecast is held for every day of the month after the origin, as the persistence baseline
  holds the last known phase and last month's total.

Each origin is a run folder of its own (``DIR/origins/2025-03/``, with ``origin.json``
written last), so a killed backtest resumes where it stopped: complete origins are read
back, an interrupted one resumes its training. Every origin's run has the same step
specification, so one set of compiled steps serves them all. The report is
``backtest.json``, ``backtest.csv`` (one row per origin x task x score x forecaster),
``backtest.png`` and a printed summary.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from tqdm import tqdm

from han_jax import tasks as task_registry
from han_jax.app.evaluate import MODEL, forecasters, split_targets
from han_jax.app.predict import window_predictions
from han_jax.app.run_folder import lock_run_dir
from han_jax.app.runs import load_run
from han_jax.app.train import train
from han_jax.config import Config, ConfigError, config_to_dict
from han_jax.core.files import append_text, atomic_write, open_regular, write_json
from han_jax.data import build_datasets, build_inference_windows, known_at, make_world
from han_jax.data.world import DataError
from han_jax.tasks import TableContext
from han_jax.tasks.base import Known
from han_jax.training.checkpoints import checkpoint_epoch

ORIGINS_DIR = "origins"
# In each origin's folder, written last: its presence marks the origin complete.
ORIGIN_FILE = "origin.json"
SETTINGS_FILE = "backtest_config.json"
REPORT_FILE = "backtest.json"
TABLE_FILE = "backtest.csv"
PLOT_FILE = "backtest.png"
TRAIN_LOG = "train.log"
# How each origin's model is trained: from scratch, or continuing from the previous origin's best state.
REFITS = ("full", "warm")
# Scores where a higher value is better; every other score is an error (lower is better).
HIGHER_IS_BETTER = ("balanced_accuracy", "average_precision")
# Scores that are not compared across forecasters in the summary (coverage is judged against its level).
NOT_COMPARED = ("coverage_90",)


def parse_origins(text: str) -> List[np.datetime64]:
    """``FIRST:LAST[:STEP_MONTHS]`` (months ``YYYY-MM``) as month-start days; one-line errors name ``--origins``."""
    parts = str(text).split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"--origins={text!r}: expected FIRST:LAST[:STEP_MONTHS], e.g. 2025-01:2025-12")
    try:
        first, last = (np.datetime64(p.strip(), "M") for p in parts[:2])
    except ValueError:
        raise ConfigError(f"--origins={text!r}: expected months YYYY-MM") from None
    step = 1
    if len(parts) == 3:
        try:
            step = int(parts[2])
        except ValueError:
            step = 0
        if step < 1:
            raise ConfigError(f"--origins={text!r}: expected a step of whole months >= 1")
    if last < first:
        raise ConfigError(f"--origins={text!r}: the last origin is before the first")
    months = np.arange(first, last + 1, step)
    return [m.astype("datetime64[D]") for m in months]


def origin_label(day: np.datetime64) -> str:
    return str(day.astype("datetime64[M]"))


def _month_after(day: np.datetime64) -> np.datetime64:
    return (day.astype("datetime64[M]") + 1).astype("datetime64[D]")


def _data_end(world) -> np.datetime64:
    return max(np.asarray(t.dates, "datetime64[D]")[-1] for t in world.daily.values())


def check_origins(days: Sequence[np.datetime64], world) -> None:
    """Every origin's scored month must lie inside the data (a one-line error naming ``--origins``)."""
    end = _data_end(world)
    for day in days:
        scored_end = _month_after(day) - np.timedelta64(1, "D")
        if scored_end > end:
            raise ConfigError(f"--origins: origin {origin_label(day)} forecasts {origin_label(day)} (to {scored_end}); "
                              f"the data ends on {end}; expected a last origin whose month the data covers")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What makes two backtests the same one: the configuration, the origins, the refit and the data itself."""

    config: dict
    origins: tuple
    refit: str
    data: str = ""

    def as_json(self) -> dict:
        return {"config": self.config, "origins": list(self.origins), "refit": self.refit, "data": self.data}


def fingerprint(world) -> str:
    """A SHA-256 of every dated table of ``world``: a resumed backtest must read the data its origins read."""
    digest = hashlib.sha256()
    tables = [*world.daily.values(), *world.monthly.values()]
    arrays = [a for t in tables for a in (t.name.encode(), np.asarray(t.dates, "datetime64[D]"),
                                          np.asarray(t.values, np.float64))]
    for target in (world.day_targets, world.month_targets):
        arrays += [np.asarray(getattr(target, f.name)) for f in dataclasses.fields(target)
                   if getattr(target, f.name) is not None]
    for a in arrays:
        digest.update(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _check_settings(run_dir: str, settings: Settings) -> None:
    path = os.path.join(run_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        write_json(path, settings.as_json())
        return
    with os.fdopen(open_regular(path, os.O_RDONLY), "r") as f:
        saved = json.load(f)
    differ = [k for k, v in settings.as_json().items() if saved.get(k) != json.loads(json.dumps(v))]
    if differ:
        raise ConfigError(f"{path}: this folder holds a backtest with other {', '.join(differ)}; expected the same "
                          "settings to resume it, or another --run-dir")


def _read_origin(folder: str) -> Optional[dict]:
    path = os.path.join(folder, ORIGIN_FILE)
    if not os.path.exists(path):
        return None
    with os.fdopen(open_regular(path, os.O_RDONLY), "r") as f:
        return json.load(f)


def known_at_origin(world, day: np.datetime64) -> Known:
    """What the baselines may read at an origin: the last day's phase, the months' fatality totals before it."""
    dt = world.day_targets
    dates = np.asarray(dt.dates, "datetime64[D]")
    last = np.flatnonzero(dates < day)
    phase = None
    if len(last) and bool(np.asarray(dt.phase_valid)[last[-1]]) and dates[last[-1]] == day - np.timedelta64(1, "D"):
        phase = int(np.asarray(dt.phase_index)[last[-1]])
    mt = world.month_targets
    ok = np.asarray(mt.casualty_valid, bool) & (np.asarray(mt.months, "datetime64[D]") < day)
    return Known(phase, np.asarray(mt.fatalities, np.float64)[ok])


def _rows(targets, index):
    """The ``Targets`` rows ``index`` (numpy)."""
    def take(x):
        return None if x is None else np.asarray(x)[index]

    return type(targets)(**{f.name: take(getattr(targets, f.name)) for f in dataclasses.fields(targets)})


def _hide_unpublished(targets, layout, lags: Mapping[str, int]):
    """The origin row's forecast targets with each lagged monthly source's unpublished months masked.

    Position -1 is the month after the origin (the outcome); positions -2 .. -1-lag are the
    months a source published ``lag`` months late had not yet published at the origin.
    """
    if not lags or targets.forecast_masks is None:
        return targets
    masks = np.array(targets.forecast_masks, bool)
    start = 0
    for src, feats in layout.monthly:
        lag = lags.get(src, 0)
        if lag:
            masks[:, -1 - lag:-1, start:start + len(feats)] = False
        start += len(feats)
    return dataclasses.replace(targets, forecast_masks=masks)


def _plain(x):
    """Numpy arrays and scalars inside ``x`` as JSON data (lists and floats)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x, np.float64).tolist()
    return x


def score_origin(folder: str, day: np.datetime64, whole) -> dict:
    """One origin's forecast and scores (``origin.json``): the run in ``folder``, trained on ``whole`` at ``day``."""
    run = load_run(folder, "best")
    data = run.config.data
    known = known_at(whole, day, data.publication_lags)
    last_day = day - np.timedelta64(1, "D")
    window = build_inference_windows(known, data, run.normalisation, run.layout, date_from=last_day, date_to=last_day)
    predictions = window_predictions(run, window.split)
    # What happened through the month after the origin, read with the run's own normalisation.
    month_end = _month_after(day) - np.timedelta64(1, "D")
    happened = known_at(whole, _month_after(day))
    outcome_data = dataclasses.replace(data, known_at=None, publication_lags=())
    outcome = build_inference_windows(happened, outcome_data, run.normalisation, run.layout, date_from=last_day,
                                      date_to=month_end)
    if outcome.dates[0] != last_day:
        raise DataError(f"origin {origin_label(day)}: no window ends on {last_day}; expected data up to the origin")
    all_rows = split_targets(outcome.split)
    rows = {"origin": _hide_unpublished(_rows(all_rows, slice(0, 1)), run.layout, dict(data.publication_lags)),
            "month": _rows(all_rows, slice(1, None)), "month_once": _rows(all_rows, slice(1, 2))}
    train_targets = split_targets(build_datasets(known, data).train)
    ctx = TableContext(run.spec.objective.model, run.spec.objective.loss, run.normalisation, run.layout)
    base = known_at_origin(known, day)
    scores, calibration = [], {}
    for task in run.spec.objective.tasks:
        targets = rows[task.backtest_rows]
        for forecaster, forecast in forecasters(task, predictions, train_targets, targets, base, ctx).items():
            for score, value in task.proper_scores(forecast, targets, ctx).items():
                scores.append({"origin": origin_label(day), "task": task.name, "score": score,
                               "forecaster": forecaster, "value": value})
        cal = task.calibration(predictions, targets, ctx)
        if cal:
            calibration[task.name] = _plain(cal)
    return {"origin": origin_label(day), "known_through": str(last_day), "scored_month": origin_label(day),
            "predictions": {k: np.asarray(v)[0].tolist() for k, v in predictions.items()},
            "scores": scores, "calibration": calibration}


def backtest(config: Config, run_dir: str, *, origins: str, refit: str = "full", quiet: bool = False,
             log=print, world=None) -> dict:
    """Runs (or resumes) a rolling-origin backtest into ``run_dir`` and writes its report.

    Args:
      config: the configuration every origin's run starts from (``data.known_at`` is set per origin).
      run_dir: the backtest's folder.
      origins: ``FIRST:LAST[:STEP_MONTHS]``.
      refit: ``"full"`` (each origin from scratch) or ``"warm"`` (from the previous origin's best state).
      quiet: no progress bar.
      log: where the summary goes.
      world: the whole data (default the data ``config.data`` names).

    Returns:
      The report (``backtest.json``'s content).
    """
    if refit not in REFITS:
        raise ConfigError(f"--refit={refit!r}; expected one of {', '.join(REFITS)}")
    if config.data.prediction_horizon != 1:
        # The outcome is the month after the origin; a longer horizon would forecast a month the outcome lacks.
        raise ConfigError(f"data.prediction_horizon={config.data.prediction_horizon}: a backtest scores the month "
                          "after each origin; expected 1")
    if config.data.known_at is not None:
        raise ConfigError(f"data.known_at={config.data.known_at!r}: a backtest sets it at each origin; expected it "
                          "unset")
    days = parse_origins(origins)
    whole = make_world(config.data) if world is None else world  # bad data fails here, before any training
    check_origins(days, whole)
    known_at(whole, days[0], config.data.publication_lags)  # a lag naming no source fails here too
    settings = Settings(config_to_dict(config), tuple(origin_label(d) for d in days), refit, fingerprint(whole))
    os.makedirs(run_dir, exist_ok=True)
    with lock_run_dir(run_dir, "han-jax backtest"):
        _check_settings(run_dir, settings)
        done, previous = [], None
        bar = tqdm(days, desc="backtest origins", disable=quiet, file=sys.stderr)
        for day in bar:
            bar.set_postfix_str(origin_label(day))
            folder = os.path.join(run_dir, ORIGINS_DIR, origin_label(day))
            result = _read_origin(folder)
            if result is None:
                os.makedirs(folder, exist_ok=True)
                origin_config = config.replace(data=dataclasses.replace(config.data, known_at=str(day)))
                resume = checkpoint_epoch(folder) is not None
                train_log = os.path.join(folder, TRAIN_LOG)

                def to_file(*parts, path=train_log):
                    append_text(path, " ".join(str(p) for p in parts) + "\n")

                train(origin_config, folder, resume=resume, quiet=True, log=to_file,
                      init_from=previous if refit == "warm" and not resume else None,
                      world=known_at(whole, day, config.data.publication_lags))
                result = score_origin(folder, day, whole)
                write_json(os.path.join(folder, ORIGIN_FILE), result)
            done.append(result)
            previous = folder
        bar.close()
        report = summarise(done, settings)
        write_json(os.path.join(run_dir, REPORT_FILE), report)
        atomic_write(os.path.join(run_dir, TABLE_FILE), lambda f: f.write(scores_csv(done)))
        plot_backtest(report, done, os.path.join(run_dir, PLOT_FILE))
    log(summary_table(report, title=f"{run_dir}: backtest over {len(days)} origin(s) ({days[0].astype('datetime64[M]')}"
                                    f"..{days[-1].astype('datetime64[M]')}, refit {refit})"))
    return report


def scores_csv(origins: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["origin", "task", "score", "forecaster", "value"])
    for result in origins:
        for row in result["scores"]:
            value = row["value"]
            writer.writerow([row["origin"], row["task"], row["score"], row["forecaster"],
                             "" if value is None else repr(float(value))])
    return out.getvalue()


def _better(score: str, a: float, b: float) -> bool:
    return a > b if score in HIGHER_IS_BETTER else a < b


def summarise(origins: Sequence[dict], settings: Settings) -> dict:
    """Mean and spread over origins of every task x score x forecaster, and how often the model beats the best baseline.

    "Beats" compares the model with the baseline that is best on that origin; an origin where
    the score is missing for the model or every baseline does not count. A non-finite score
    (an unclamped log score of an impossible outcome) is counted in ``non_finite_origins``
    and left out of the mean.
    """
    values: Dict[tuple, Dict[str, float]] = {}
    non_finite: Dict[tuple, int] = {}
    for result in origins:
        for row in result["scores"]:
            key = (row["task"], row["score"], row["forecaster"])
            if row["value"] is None:
                continue
            if not math.isfinite(row["value"]):
                # Reported beside the mean (which is over the finite origins), never silently dropped.
                non_finite[key] = non_finite.get(key, 0) + 1
                continue
            values.setdefault(key, {})[row["origin"]] = float(row["value"])
    summary = []
    for key in non_finite:
        values.setdefault(key, {})
    keys = sorted({(t, s) for t, s, _ in values}, key=lambda k: (k[0], k[1]))
    for task, score in keys:
        names = [f for (t, s, f) in values if (t, s) == (task, score)]
        names = [MODEL] + sorted(n for n in names if n != MODEL) if MODEL in names else sorted(names)
        wins = n_compared = 0
        if MODEL in names and score not in NOT_COMPARED:
            for origin, model_value in values[(task, score, MODEL)].items():
                others = [values[(task, score, n)][origin] for n in names
                          if n != MODEL and origin in values[(task, score, n)]]
                if others:
                    best = max(others) if score in HIGHER_IS_BETTER else min(others)
                    n_compared += 1
                    wins += _better(score, model_value, best)
        for name in names:
            v = np.asarray(list(values[(task, score, name)].values()))
            summary.append({"task": task, "score": score, "forecaster": name, "origins": int(v.size),
                            "non_finite_origins": non_finite.get((task, score, name), 0),
                            "mean": float(v.mean()) if v.size else None,
                            "std": float(v.std(ddof=1)) if v.size > 1 else None,
                            "model_beats_best_baseline": (wins / n_compared if n_compared else None)
                            if name == MODEL else None})
    return {**settings.as_json(), "n_origins": len(origins), "summary": summary}


def summary_table(report: Mapping, *, title: str) -> str:
    """The printed summary: one line per task x score x forecaster (mean, spread over origins, model wins)."""
    lines = [title, f"{'task':14s} {'score':20s} {'forecaster':14s} {'mean':>12s} {'std':>10s} {'origins':>7s} "
                    f"{'model beats best baseline':>26s}"]
    for row in report["summary"]:
        std = "n/a" if row["std"] is None else f"{row['std']:.4g}"
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.4f}"
        wins = row["model_beats_best_baseline"]
        wins = "" if row["forecaster"] != MODEL else ("n/a" if wins is None else f"{100 * wins:.0f} % of origins")
        lines.append(f"{row['task']:14s} {row['score']:20s} {row['forecaster']:14s} {mean:>12s} {std:>10s} "
                     f"{row['origins']:7d} {wins:>26s}"
                     + (f"  ({row['non_finite_origins']} non-finite origin(s) left out)"
                        if row.get("non_finite_origins") else ""))
    return "\n".join(lines)


def _pooled_reliability(origins: Sequence[dict], task: str) -> Optional[dict]:
    parts = [r["calibration"][task]["reliability"] for r in origins if task in r.get("calibration", {})]
    if not parts:
        return None
    count = np.sum([np.asarray(p["count"], np.float64) for p in parts], axis=0)

    def pooled(key):
        total = np.sum([np.nan_to_num(np.asarray(p[key], np.float64)) * np.asarray(p["count"]) for p in parts], axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    return {"count": count, "confidence": pooled("confidence"), "frequency": pooled("frequency")}


def plot_backtest(report: Mapping, origins: Sequence[dict], path: str) -> None:
    """``backtest.png``: each task's headline score over origins (model and baselines), reliability and PIT panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {t.name: t.headline_score for t in task_registry.tasks() if t.headline_score}
    tasks = [t for t in headline if any(r["task"] == t and r["score"] == headline[t] and r["value"] is not None
                                        for o in origins for r in o["scores"])]
    # Each task's calibration panels, in registry order: a reliability diagram or a PIT histogram.
    extra = list(dict.fromkeys((t.name, kind) for t in task_registry.tasks() for o in origins
                               for kind in o.get("calibration", {}).get(t.name, {})))
    n = max(1, len(tasks) + len(extra))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), squeeze=False)
    labels = [o["origin"] for o in origins]
    for ax, task in zip(axes[:, 0], tasks):
        score = headline[task]
        by_forecaster: Dict[str, list] = {}
        for o in origins:
            for r in o["scores"]:
                if r["task"] == task and r["score"] == score:
                    by_forecaster.setdefault(r["forecaster"], {})[o["origin"]] = r["value"]
        for i, (name, vals) in enumerate(sorted(by_forecaster.items(), key=lambda kv: kv[0] != MODEL)):
            ys = [np.nan if vals.get(lab) is None else vals[lab] for lab in labels]
            ax.plot(labels, ys, marker="o", ms=3, lw=2 if name == MODEL else 1, color="k" if name == MODEL else f"C{i}",
                    label=name)
        finite = [v for vals in by_forecaster.values() for v in vals.values() if v is not None]
        if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            ax.set_yscale("log")  # a far-off baseline (zero counts) would flatten the others
        ax.set_title(f"{task}: {score} at each origin (lower is better)", fontsize=9)
        ax.legend(fontsize=7, ncol=5)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    for ax, (task, kind) in zip(axes[len(tasks):, 0], extra):
        if kind == "reliability":
            rel = _pooled_reliability(origins, task)
            ax.plot([0, 1], [0, 1], color="0.6", lw=1)
            ax.plot(rel["confidence"], rel["frequency"], marker="o", color="k")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{task}: reliability over all origins (predicted probability vs observed frequency)",
                         fontsize=9)
        else:
            pit = np.concatenate([np.asarray(o["calibration"][task]["pit"]) for o in origins
                                  if task in o.get("calibration", {})])
            ax.hist(pit, bins=10, range=(0, 1), color="C0")
            ax.axhline(len(pit) / 10, color="k", lw=1)
            ax.set_title(f"{task}: randomised PIT over all origins (flat: calibrated)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)
