"""The batch format shared by the data pipeline, the model, the losses and the steps.

A batch is ``(inputs, targets)``. Both are ``flax.struct`` dataclasses, so they
are pytrees that pass through ``jit`` and ``pmap`` unchanged. Every array has a
static shape; absent values are 0 with a False mask (the original's -999
sentinel never reaches the model), and padding rows of a partial batch carry
``sample_mask=False``.

Per-source arrays are dicts keyed by source name. The *order* of sources is
never taken from the dict (pytree dicts are key-sorted); it comes from the
model configuration.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax

Array = jax.Array


@flax.struct.dataclass
class Inputs:
    """Model inputs for B rows.

    Attributes:
      daily_features: ``{source: f32 [B, T, F_s]}``, z-scored, 0 where unobserved.
      daily_masks: ``{source: bool [B, T, F_s]}``, True = observed.
      monthly_features: ``{source: f32 [B, M, F_s]}``.
      monthly_masks: ``{source: bool [B, M, F_s]}``.
      month_boundaries: int32 ``[B, M, 2]``: (start, end) day indices of each
        month inside the daily window, end exclusive; ``[0, 0]`` for months
        outside the calendar.
    """

    daily_features: dict
    daily_masks: dict
    monthly_features: dict
    monthly_masks: dict
    month_boundaries: Array


@flax.struct.dataclass
class Targets:
    """Per-row targets and their validity masks (one row per anchor day).

    A field set to ``None`` means that kind of target is not available at all
    (the loss takes the original's static no-targets fallback); a False
    validity mask means "no valid target for this row" (dynamic fallback).

    Attributes:
      phase_index: int32 [B], the 11-phase regime index (0..10).
      phase_valid: bool [B].
      is_transition: bool [B], the anchor day starts a new phase.
      fatalities: f32 [B], raw monthly fatality counts of the anchor's month.
      casualty_valid: bool [B].
      anomaly: f32 [B], the VIIRS radiance anomaly z-score.
      anomaly_valid: bool [B].
      forecast_targets: f32 [B, M, Ft], next-month targets, monthly sources
        first then daily sources, in source order.
      forecast_masks: bool [B, M, Ft].
      sample_mask: bool [B], False for padding rows of a partial batch.
      daily_forecast_targets: f32 [B, H, Fd] or None (the original's collate
        drops them, so None is the default).
      daily_forecast_masks: bool [B, H, Fd] or None.
      daily_obs_rate: f32 [B] or None, observed fraction of the first daily
        source's days (logging only, as in the original).
      monthly_obs_rate: f32 [B] or None, observed fraction of the first
        monthly source's months (drives validation's high/low-obs split).
    """

    phase_index: Optional[Array]
    phase_valid: Optional[Array]
    is_transition: Optional[Array]
    fatalities: Optional[Array]
    casualty_valid: Optional[Array]
    anomaly: Optional[Array]
    anomaly_valid: Optional[Array]
    forecast_targets: Optional[Array]
    forecast_masks: Optional[Array]
    sample_mask: Array
    daily_forecast_targets: Optional[Array] = None
    daily_forecast_masks: Optional[Array] = None
    daily_obs_rate: Optional[Array] = None
    monthly_obs_rate: Optional[Array] = None
