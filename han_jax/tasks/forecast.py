"""Forecast: every monthly source's features one month ahead, a regression on normalised values.

The forecast head predicts, at each month position m of the window, the features of month
m + 1 (``forecast_pred [B, M, n_monthly_features]``); the targets hold the monthly sources
first, then monthly means of the daily ones, and the head covers the monthly block. Loss
(the original's ``_compute_autoregressive_forecast_loss``): MSE over every valid position,
a penalty when the predictions vary less than 30 % of the targets, and smoothness and
temporal-variance terms over the months, floored at 0.01; without targets, the smoothness
terms alone.

Metrics: ``forecast_mse`` over every position, and ``forecast_next_mse``, the genuine
one-month-ahead forecast: the last position only, on the elements :func:`next_month_elements`
selects, overall and per source. Baselines: persistence ("next month = this month") and the
training split's per-feature climatology, scored on exactly those elements.

Proper scores (:meth:`ForecastTask.proper_scores`), overall and per source, in normalised
units: MSE, MAE, the CRPS (a point forecast's is its absolute error) and the MASE, the MAE
over persistence's on the same elements; against zero, persistence (the last month the window
holds), the training climatology and "conflictology", the empirical distribution of the
earlier months the window holds (``monthly_seq_len - 1`` of them).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.core import scores
from han_jax.core.reductions import masked_moments, masked_sum, namespace, ratio, sum_and_count
from han_jax.tasks.base import Task, as_array, held, host_mean, line_panel, skill_score

PERSISTENCE = "baseline/forecast_persistence_mse"
CLIMATOLOGY = "baseline/forecast_climatology_mse"


def next_month_elements(masks, sample_mask):
    """The element set E of every next-month metric, model and baselines alike; jax or numpy.

    The genuine next-month forecast is the last position ``m = M-1`` (earlier positions
    forecast months the window already holds). An element ``(row, f)`` belongs to E when the
    row is real, its target ``[row, M-1, f]`` is valid and the persistence input, this
    month's value ``[row, M-2, f]`` (the target of the position before), is valid too.
    Nothing else enters: the model, persistence and climatology are scored on E itself, so
    every skill compares errors on identical elements.

    Note: with ``DataConfig.prediction_horizon = h > 1`` position M-2 holds month
    ``anchor + h - 1``, which lies after the anchor; persistence is then an optimistic
    (leaking) baseline. It is the genuine "this month" for h = 1.

    Args:
      masks: bool [B, M, F], the forecast targets' validity.
      sample_mask: bool [B], real rows.

    Returns:
      bool [B, F]; all False when M < 2.
    """
    xp = namespace(masks, sample_mask)
    masks = xp.asarray(masks).astype(bool)
    if masks.shape[1] < 2:
        return xp.zeros((masks.shape[0], masks.shape[2]), bool)
    return xp.asarray(sample_mask).astype(bool)[:, None] & masks[:, -1] & masks[:, -2]


def source_columns(sources, n_total: int) -> list:
    """``[(name, slice)]`` of consecutive column blocks from column 0; raises if they need more than ``n_total``."""
    out, start = [], 0
    for name, n in sources:
        out.append((name, slice(start, start + int(n))))
        start += int(n)
    if start > n_total:
        raise ValueError(f"forecast sources need {start} columns; the forecast targets have {n_total}")
    return out


def _zero_in_model_units(ctx) -> np.ndarray:
    """A forecast of 0 (no events, no losses) for every monthly feature, in the normalised units the head predicts.

    The count transform maps 0 to 0, so zero is the z-score of 0 under the run's train statistics.
    """
    stats = ctx.normalisation.stats.monthly
    return np.concatenate([(0.0 - stats.mean[src]) / stats.std[src] for src, _ in ctx.layout.monthly])


def _last_known(y, ok):
    """Each element's last valid value before the window's last month (0 where none): persistence."""
    earlier, earlier_ok = y[:, :-1], ok[:, :-1]
    # Index of the last valid month per element; argmax over the reversed axis finds it.
    last = earlier.shape[1] - 1 - np.argmax(earlier_ok[:, ::-1], axis=1)
    value = np.take_along_axis(earlier, last[:, None, :], axis=1)[:, 0]
    return np.where(earlier_ok.any(axis=1), value, 0.0)


def _per_row_var_over_months(x):
    """``x.var(dim=1)`` with ddof=1 per row and feature: [B, M, F] -> [B, F]."""
    mean = jnp.mean(x, axis=1, keepdims=True)
    return jnp.sum(jnp.square(x - mean), axis=1) / (x.shape[1] - 1)


def _temporal_statistics(x, row, axis_name) -> dict:
    """Month-to-month squared steps and per-row month variances of ``x [B, M, F]`` (M >= 2).

    The month variance is a per-row quantity whose masked *mean* is taken, so it travels as
    a sum and a count, not as Moments.
    """
    stats = {}
    stats["smooth_sum"], stats["smooth_count"] = sum_and_count(
        jnp.square(x[:, 1:] - x[:, :-1]), row[:, None, None], axis_name=axis_name)
    stats["month_var_sum"], stats["month_var_count"] = sum_and_count(
        _per_row_var_over_months(x), row[:, None], axis_name=axis_name)
    return stats


class ForecastTask(Task):
    name = "forecast"
    headline_score = "mae"
    outputs = ("forecast_pred",)
    prior = 1.9
    watch_collapse = True
    metric_counts = {"forecast_mse": "n/forecast", "forecast_next_mse": "n/forecast_next"}
    table_rows = ("forecast_mse", "forecast_next_mse", PERSISTENCE, CLIMATOLOGY)
    backtest_rows = "origin"

    def statistics(self, outputs, targets, row, config, axis_name):
        pred = outputs["forecast_pred"]
        _, m, f_pred = pred.shape
        row3 = row[:, None, None]
        stats = {}
        stats["pred_sq_sum"], stats["pred_sq_count"] = sum_and_count(jnp.square(pred), row3, axis_name=axis_name)
        if targets.forecast_targets is None or targets.forecast_masks is None:
            if m >= 2:
                stats.update(_temporal_statistics(pred, row, axis_name))
            return stats
        k = min(f_pred, targets.forecast_targets.shape[-1])
        p = pred[..., :k]
        masks = targets.forecast_masks[..., :k].astype(bool)
        valid = masks & row3
        t = jnp.where(valid, targets.forecast_targets[..., :k].astype(jnp.float32), 0.0)
        sq_err = jnp.square(p - t)
        stats["sq_err_sum"], stats["n_valid"] = sum_and_count(sq_err, valid, axis_name=axis_name)
        stats["pred"] = masked_moments(p, valid, axis_name=axis_name)
        stats["target"] = masked_moments(t, valid, axis_name=axis_name)
        if m >= 2:
            stats.update(_temporal_statistics(p, row, axis_name))
        nxt = next_month_elements(masks, row)
        stats["next_sq_err"] = masked_sum(sq_err[:, -1], nxt, axis=0, axis_name=axis_name)  # [F]
        stats["next_count"] = masked_sum(nxt, axis=0, axis_name=axis_name)  # [F]
        return stats

    def finalize(self, s, config):
        tiny = 1e-6 * ratio(s["pred_sq_sum"], s["pred_sq_count"])
        has_months = "smooth_sum" in s
        if "sq_err_sum" not in s:
            if not has_months:
                return tiny, jnp.float32(0.0)
            smooth = ratio(s["smooth_sum"], s["smooth_count"])
            var_mean = ratio(s["month_var_sum"], s["month_var_count"])
            return 0.01 * smooth + 0.1 * jax.nn.relu(0.5 - var_mean), jnp.float32(0.0)
        n_valid = s["n_valid"]
        mse = ratio(s["sq_err_sum"], n_valid)
        var_pred, var_target = s["pred"].variance(), s["target"].variance()
        use_penalty = (n_valid >= 2) & (var_target > 1e-6)
        variance_penalty = jnp.where(use_penalty, 0.5 * jax.nn.relu(0.3 - var_pred / (var_target + 1e-6)), 0.0)
        if has_months:
            smooth = 0.01 * ratio(s["smooth_sum"], s["smooth_count"])
            temporal_var = ratio(s["month_var_sum"], s["month_var_count"])
            temporal_penalty = 0.1 * jax.nn.relu(0.1 - temporal_var)
        else:
            smooth = temporal_penalty = jnp.float32(0.0)
        total = jnp.maximum(mse + smooth + variance_penalty + temporal_penalty, 0.01)
        return jnp.where(n_valid > 0, total, tiny), n_valid

    def metrics(self, s, model):
        xp = namespace(s["pred_sq_sum"])
        if "sq_err_sum" in s:
            err, count = s["next_sq_err"], s["next_count"]
            m = {"forecast_mse": ratio(s["sq_err_sum"], s["n_valid"]), "n/forecast": s["n_valid"]}
        else:
            err = count = xp.zeros((model.n_monthly_features,), xp.float32)
            m = {"forecast_mse": 0.0 * s["pred_sq_sum"], "n/forecast": 0.0 * s["pred_sq_sum"]}
        m["forecast_next_mse"], m["n/forecast_next"] = ratio(xp.sum(err), xp.sum(count)), xp.sum(count)
        for name, cols in source_columns(model.monthly_sources, err.shape[0]):
            m[f"forecast_next_mse/{name}"] = ratio(xp.sum(err[cols]), xp.sum(count[cols]))
            m[f"n/forecast_next/{name}"] = xp.sum(count[cols])
        return m

    def count_key(self, key):
        if key.startswith("forecast_next_mse/"):
            return "n/forecast_next/" + key.split("/", 1)[1]
        return super().count_key(key)

    # -- baselines: persistence and climatology --------------------------------------------------

    def fit_baseline(self, train, model, loss) -> Optional[np.ndarray]:
        """The per-feature climatology: the mean train target at the last position over its valid elements.

        A feature without any valid train element gets 0: the value the train-only normalisation
        gives every feature on average, and the one it fits for a feature with no train data
        (mean 0, std 1, ``han_jax.data.normalisation``). It is thus defined on every element of
        E, so persistence, climatology and the model are scored on the same elements.

        Returns:
          float64 ``[Ft]`` (read-only), or None when the targets carry no forecast targets or no month.
        """
        if train.forecast_targets is None or train.forecast_masks is None:
            return None
        y = as_array(train.forecast_targets, np.float64)
        if y.shape[1] < 1:
            return None
        where = as_array(train.forecast_masks, bool)[:, -1] & as_array(train.sample_mask, bool)[:, None]
        count = where.sum(axis=0)
        total = np.where(where, y[:, -1], 0.0).sum(axis=0)
        climatology = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        climatology.setflags(write=False)
        return climatology

    def baseline_metrics(self, climatology, targets, model, loss):
        sources = model.monthly_sources
        blocks = [""] + [f"/{name}" for name, _ in sources]
        if targets.forecast_targets is None or targets.forecast_masks is None:
            return {f"{kind}{suffix}": None for kind in (PERSISTENCE, CLIMATOLOGY) for suffix in blocks}
        y = as_array(targets.forecast_targets, np.float64)
        n_rows, n_months, n_total = y.shape
        if climatology is not None and np.shape(climatology) != (n_total,):
            raise ValueError(f"climatology has shape {np.shape(climatology)}; expected ({n_total},) like the "
                             "forecast targets")
        elements = next_month_elements(as_array(targets.forecast_masks, bool), as_array(targets.sample_mask, bool))
        columns = source_columns(sources, n_total)
        covered = slice(0, columns[-1][1].stop if columns else 0)
        if n_months >= 2:
            truth, current = y[:, -1], y[:, -2]
        else:  # E is empty; any arrays of the right shape do
            truth = current = np.zeros((n_rows, n_total))
        clim = np.zeros(n_total) if climatology is None else climatology
        persistence_err = np.square(current - truth)
        climatology_err = np.square(clim[None, :] - truth)
        m = {}
        for suffix, cols in [("", covered)] + [(f"/{name}", cols) for name, cols in columns]:
            where = elements[:, cols]
            m[f"{PERSISTENCE}{suffix}"] = host_mean(persistence_err[:, cols], where)
            m[f"{CLIMATOLOGY}{suffix}"] = None if climatology is None else host_mean(climatology_err[:, cols], where)
        return m

    def skill(self, metrics):
        g = metrics.get
        out = {"skill/forecast": skill_score(g("forecast_next_mse"), [g(PERSISTENCE), g(CLIMATOLOGY)])}
        names: dict = {}
        for key in metrics:
            for prefix in ("forecast_next_mse", PERSISTENCE, CLIMATOLOGY):
                if key.startswith(prefix + "/"):
                    names.setdefault(key[len(prefix) + 1:], None)
        for name in names:
            out[f"skill/forecast/{name}"] = skill_score(
                g(f"forecast_next_mse/{name}"), [g(f"{PERSISTENCE}/{name}"), g(f"{CLIMATOLOGY}/{name}")])
        return out

    def table_lines(self, final, splits, width):
        per_source = sorted(k for k in final[splits[0]] if k.startswith("forecast_next_mse/"))
        if not per_source:
            return []
        lines = ["next-month forecast MSE per source (model / persistence / climatology):"]
        for key in per_source:
            src = key.split("/", 1)[1]
            cells = []
            for s in splits:
                values = [final[s].get(key), final[s].get(f"{PERSISTENCE}/{src}"), final[s].get(f"{CLIMATOLOGY}/{src}")]
                cells.append("/".join("n/a" if v is None else f"{v:.3g}" for v in values))
            lines.append(f"  {src:{width - 2}s} " + " ".join(f"{c:>24s}" for c in cells))
        return lines

    # -- proper scores ---------------------------------------------------------------------------

    def baseline_forecasts(self, train, targets, known, ctx):
        if targets.forecast_targets is None or targets.forecast_masks is None:
            return {}
        y = as_array(targets.forecast_targets, np.float64)
        ok = as_array(targets.forecast_masks, bool)
        out = {"persistence": {"forecast_next": _last_known(y, ok)},
               "conflictology": {"samples": y[:, :-1], "sample_masks": ok[:, :-1]}}
        climatology = self.fit_baseline(train, ctx.model, ctx.loss)
        if climatology is not None:
            out["climatology"] = {"forecast_next": climatology[None, :]}
        if ctx.normalisation is not None and ctx.layout is not None:
            out["zero"] = {"forecast_next": _zero_in_model_units(ctx)[None, :]}
        return out

    def proper_scores(self, forecast, targets, ctx):
        """Scores on the elements whose next month is valid and for which some earlier month in the window is.

        The element set is :func:`next_month_elements`' with "the month before is valid"
        relaxed to "an earlier month is" (persistence then holds the last valid one), so
        that a monthly source published late keeps its elements in a backtest.
        """
        sources = source_columns(ctx.model.monthly_sources, ctx.model.n_monthly_features)
        keys = [""] + [f"/{name}" for name, _ in sources]
        empty = {f"{score}{k}": None for score in ("mse", "mae", "crps", "mase") for k in keys}
        if targets.forecast_targets is None or targets.forecast_masks is None:
            return empty
        y = as_array(targets.forecast_targets, np.float64)
        ok = as_array(targets.forecast_masks, bool)
        n, n_months, _ = y.shape
        if n_months < 2:
            return empty
        width = ctx.model.n_monthly_features
        truth, history, history_ok = y[:, -1, :width], y[:, :-1, :width], ok[:, :-1, :width]
        elements = as_array(targets.sample_mask, bool)[:, None] & ok[:, -1, :width] & history_ok.any(axis=1)
        persistence_error = np.abs(_last_known(y, ok)[:, :width] - truth)
        if "samples" in forecast:
            samples = np.asarray(forecast["samples"], np.float64)[..., :width]
            samples = np.broadcast_to(samples, (n,) + history.shape[1:])
            where = np.broadcast_to(np.asarray(forecast["sample_masks"], bool)[..., :width], samples.shape)
            # One empirical distribution per element: its months as samples.
            flat = np.moveaxis(samples, 1, -1).reshape(-1, samples.shape[1])
            flat_ok = np.moveaxis(where, 1, -1).reshape(-1, samples.shape[1])
            safe_truth = np.where(elements, truth, 0.0).reshape(-1)
            crps = scores.empirical_crps(flat, safe_truth, where=flat_ok).reshape(n, width)
            point = np.where(flat_ok, flat, 0.0).sum(axis=1) / np.maximum(flat_ok.sum(axis=1), 1)
            error = np.abs(point.reshape(n, width) - truth)
            elements = elements & np.moveaxis(where, 1, -1).any(axis=-1)
        else:
            error = np.abs(held(forecast["forecast_next"], n)[:, :width] - truth)
            crps = error
        out = {}
        for suffix, cols in [("", slice(0, width))] + [(f"/{name}", c) for name, c in sources]:
            where = elements[:, cols]
            mae = host_mean(error[:, cols], where)
            base = host_mean(persistence_error[:, cols], where)
            out[f"mse{suffix}"] = host_mean(np.square(error[:, cols]), where)
            out[f"mae{suffix}"] = mae
            out[f"crps{suffix}"] = host_mean(crps[:, cols], where)
            out[f"mase{suffix}"] = None if mae is None or not base else mae / base
        return out

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, outputs, model, loss):
        return {"forecast_next": outputs["forecast_pred"][:, -1].astype(jnp.float32)}

    def columns(self, predictions, targets, ctx):
        """``forecast/<source>/<feature>`` and ``actual/...`` of every monthly feature, in the data's units.

        Both come from the last position, normalised (monthly block first, in layout order);
        the saved train statistics' z-score is undone, then the count transform where the run applied it
        (a monthly source built from daily counts), so the columns are in counts.
        """
        pred_z = np.asarray(predictions["forecast_next"], np.float64)
        true_z, true_ok = np.asarray(targets["forecast_targets"])[:, -1], np.asarray(targets["forecast_masks"])[:, -1]
        cols, start = {}, 0
        for src, feats in ctx.layout.monthly:
            block = slice(start, start + len(feats))
            pred = ctx.normalisation.to_original_units("monthly", src, pred_z[:, block])
            true = np.where(true_ok[:, block], ctx.normalisation.to_original_units("monthly", src, true_z[:, block]),
                            np.nan)
            for j, feat in enumerate(feats):
                cols[f"forecast/{src}/{feat}"] = pred[:, j]
                cols[f"actual/{src}/{feat}"] = true[:, j]
            start += len(feats)
        return cols

    def describe(self, columns, i):
        by_source: dict = {}
        for key in columns:
            if key.startswith("forecast/"):
                src, feat = key[len("forecast/"):].split("/", 1)
                by_source.setdefault(src, []).append(f"{feat} {columns[key][i]:.4g}")
        month = str(columns["forecast_month"][i])[:7]
        return None, [f"  {month} forecast, {src}: {', '.join(v)}" for src, v in by_source.items()]

    def panels(self, columns, max_features: int = 4):
        """The first feature of each source (at most ``max_features``, filled up with the next ones)."""
        features = [k[len("forecast/"):] for k in columns if k.startswith("forecast/")]
        firsts = list(dict.fromkeys(f.split("/")[0] for f in features))
        chosen = [next(f for f in features if f.startswith(f"{s}/")) for s in firsts][:max_features]
        chosen += [f for f in features if f not in chosen][:max(0, max_features - len(chosen))]
        return [line_panel(f"forecast/{f}", f"actual/{f}", f"{f}, next month (original units)") for f in chosen]


FORECAST = ForecastTask()
