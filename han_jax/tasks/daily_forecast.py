"""Daily forecast: the next ``daily_forecast_horizon`` days after the anchor.

The original's default head (``use_latent_forecast=True``) predicts latent states, not
features, and is trained by a smoothness term alone (``daily_forecast_latent``). The
direct head (``use_latent_forecast=False``) predicts the daily features of days t+1..t+H,
normalised, daily sources in sorted name order as its targets; its loss is the MSE against
``Targets.daily_forecast_targets`` where the data provides them (the original's collate
drops them, so by default a tiny regulariser). No metric or baseline: the model's
daily-feature forecast is reported as predictions only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from han_jax.core.reductions import ratio, sum_and_count
from han_jax.tasks.base import Task


class DailyForecastTask(Task):
    name = "daily_forecast"
    outputs = ("daily_forecast_pred",)
    prior = 1.4

    def statistics(self, outputs, targets, row, config, axis_name):
        pred = outputs["daily_forecast_pred"]
        h = pred.shape[1]
        row3 = row[:, None, None]
        stats = {}
        stats["pred_sq_sum"], stats["pred_sq_count"] = sum_and_count(jnp.square(pred), row3, axis_name=axis_name)
        if config.daily_forecast_latent:
            if h > 1:
                stats["smooth_sum"], stats["smooth_count"] = sum_and_count(
                    jnp.square(pred[:, 1:] - pred[:, :-1]), row3, axis_name=axis_name)
            return stats
        if targets.daily_forecast_targets is None:
            return stats
        t = targets.daily_forecast_targets.astype(jnp.float32)
        valid = t > -900.0
        if targets.daily_forecast_masks is not None:
            valid = valid & targets.daily_forecast_masks.astype(bool)
        valid = valid & row3
        k = min(pred.shape[-1], t.shape[-1])
        valid = valid[..., :k]
        stats["sq_err_sum"], stats["n_valid"] = sum_and_count(
            jnp.square(pred[..., :k] - jnp.where(valid, t[..., :k], 0.0)), valid, axis_name=axis_name)
        return stats

    def finalize(self, s, config):
        sq_mean = ratio(s["pred_sq_sum"], s["pred_sq_count"])
        if config.daily_forecast_latent:
            if "smooth_sum" in s:
                return ratio(s["smooth_sum"], s["smooth_count"]) + 0.01 * sq_mean, jnp.float32(0.0)
            return 0.01 * sq_mean, jnp.float32(0.0)
        if "sq_err_sum" not in s:
            return 1e-6 * sq_mean, jnp.float32(0.0)
        n_valid = s["n_valid"]
        return jnp.where(n_valid > 0, ratio(s["sq_err_sum"], n_valid), 1e-6 * sq_mean), n_valid

    def predict(self, outputs, model, loss):
        """The direct head's days t+1..t+H (``daily_forecast [B, H, Fd]``); the latent head predicts no feature."""
        if model.use_latent_forecast:
            return {}
        return {"daily_forecast": outputs["daily_forecast_pred"].astype(jnp.float32)}

    def columns(self, predictions, targets, ctx):
        """``daily_forecast/d<k>/<source>/<feature>``: z-score and count transform (signed log1p) undone."""
        if "daily_forecast" not in predictions:
            return {}
        daily = np.asarray(predictions["daily_forecast"], np.float64)  # [N, H, Fd], sorted source names
        features = ctx.layout.features("daily")
        cols, start = {}, 0
        for src in sorted(features):
            block = slice(start, start + len(features[src]))
            values = ctx.normalisation.to_original_units("daily", src, daily[:, :, block])
            for k in range(daily.shape[1]):
                for j, feat in enumerate(features[src]):
                    cols[f"daily_forecast/d{k + 1}/{src}/{feat}"] = values[:, k, j]
            start += len(features[src])
        return cols


DAILY_FORECAST = DailyForecastTask()
