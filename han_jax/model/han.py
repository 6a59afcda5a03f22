"""MultiResolutionHAN: the whole forward pass, stage by stage.

Parameters (default config: 8,192,006, the original's count). Parameters that exist
as in the original but never receive a gradient: each daily encoder's
``feature_embedding``; each MonthlyEncoder's ``uncertainty_head_*``; the
cross-resolution ``daily_aggregator``'s ``month_query``, ``query_proj`` and
``key_proj`` (one key per month, softmax = 1); in the last fusion layer the
parameters that only update the daily sequence (``cross_attn_a_to_b``, ``gate_a``,
``norm_a``), together with ``ffn_daily`` and ``ffn_norm_daily``.

Checked against the original (torch 2.14.1 CPU, eval mode, f32, weights copied
one-to-one, no unused torch parameter): every output agrees to 2e-6 at the default
and the small configuration when no attention row is fully masked.

Speed choices that keep the maths (each checked against the dense or looped form
in ``tests/test_model_blocks.py``): causal and windowed attention in query blocks
against only the keys the mask can allow (``ModelConfig.attention_block``); the
daily transformer stacks as one pure function, vmapped over the sources' stacked
parameters on GPU/TPU (``ModelConfig.vmap_sources``); the monthly encoders as one
encoder vmapped over the sources, features padded to the widest source and masked
(everywhere: it more than halves their compiled ops; ``model/monthly_encoder.py``); dropout masks from a
counter-based hash (``model/dropout.py``); the Conv1d kernel gradient as one matmul
(``model/common.py``).

Deliberate differences from the original:
- Query rows with no valid key give zero attention output everywhere. In torch
  the causal daily encoders return NaN for leading unobserved days (day 0
  unobserved in any source but some later day observed); the NaN spreads through
  the gate convolutions and the daily temporal encoder, and the aggregation's
  nan_to_num then drops ALL daily information of that sample. Here those rows
  are finite and the rest of the sample is unaffected.
- Every source in the config must be present (source dropout is zeroed features
  and masks, which the original handles the same way).
- Layers of a transformer stack are initialised independently (torch deep-copies
  one layer, so the stacked layers start with identical in_proj weights).
- No value-based asserts; outputs are a flat dict of arrays (no Python flags);
  attention maps only with ``config.return_attention`` (the cross-resolution maps,
  the only non-empty ones in the original).
- The latent daily-forecast head reads the LAST month of ``temporal_output``
  (``c = z[:, -1]``, per the spec). The original passes the whole [B, M, D]
  sequence to LatentStatePredictor, whose ``cat`` with a [B, D] horizon embedding
  cannot work on a 3-D input; the documented output shape [B, 7, D] needs this.
- ``ModelConfig.forecast_residual`` (off by default, on in the ``small`` preset)
  adds the current month's inputs, times a learnt per-feature gain that starts at
  1, to the monthly forecast head's output, so the head starts from persistence
  (see the field's comment for the measured reason).
- ``ModelConfig.regime_daily_state`` (off by default, on in the ``small`` preset)
  lets the regime head read, beside each month's temporal output, the daily
  temporal encoder's state on that month's last day.
- ``ModelConfig.transition_head`` (off by default) adds a transition head of its
  own (``transition_logit [B, M, 1]``, on the regime head's input); the original
  reads the transition logit from the anomaly head's score.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.config import ModelConfig
from han_jax.core.precision import Policy
from han_jax.model.cross_resolution import CrossResolutionFusion
from han_jax.model.daily_encoder import DailySourceEncoder, daily_layers_fn
from han_jax.model.daily_fusion import DailyCrossSourceFusion
from han_jax.model.daily_temporal import DailyTemporalEncoder
from han_jax.model.heads import (
    CasualtyHead,
    DailyForecastingHead,
    LatentStatePredictor,
    MLPHead,
    UncertaintyEstimator,
)
from han_jax.model.monthly_aggregation import MonthlyAggregation
from han_jax.model.monthly_encoder import MultiSourceMonthlyEncoder
from han_jax.model.stacking import stack_trees
from han_jax.model.temporal_encoder import TemporalEncoder


def observation_density(daily_obs, monthly_obs, bnd):
    """0.6 * mean_s(observed-day fraction in month) + 0.4 * mean_s(month observed), clipped to [0, 1]."""
    t = daily_obs[0].shape[1]
    start, end = bnd[..., 0], bnd[..., 1]
    tt = jnp.arange(t)
    in_month = (tt >= start[..., None]) & (tt < end[..., None])
    ok = (start < end) & (end <= t)
    length = jnp.maximum(end - start, 1).astype(jnp.float32)
    daily = sum(
        jnp.where(ok, jnp.sum(in_month & o[:, None, :], axis=-1) / length, 0.0) for o in daily_obs
    ) / len(daily_obs)
    monthly = sum(o.astype(jnp.float32) for o in monthly_obs) / len(monthly_obs)
    return jnp.clip(0.6 * daily + 0.4 * monthly, 0.0, 1.0)


_GAIN_SCALE = 30.0  # forecast_residual's gain = 1 + _GAIN_SCALE * parameter (see its comment)


class MultiResolutionHAN(nn.Module, kw_only=True):
    """The original MultiResolutionHAN as a pure Flax module.

    ``__call__(inputs, *, deterministic)`` takes a :class:`han_jax.core.batch.Inputs`
    and returns a flat dict of arrays in ``policy.output_dtype``.
    """

    config: ModelConfig = ModelConfig()
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool):
        cfg, pol, det = self.config, self.policy, deterministic
        d = cfg.d_model
        bnd = jnp.asarray(inputs.month_boundaries, jnp.int32)

        # Stage 1: per-source daily encoders (causal).
        d_feats = [inputs.daily_features[n] for n in cfg.daily_source_names]
        d_masks = [inputs.daily_masks[n].astype(bool) for n in cfg.daily_source_names]
        t = d_feats[0].shape[1]
        if t > cfg.max_daily_len:
            raise ValueError(f"daily window {t} exceeds max_daily_len {cfg.max_daily_len}")
        vmap_sources = cfg.vmap_sources if cfg.vmap_sources is not None else jax.default_backend() != "cpu"
        daily_encoder = partial(
            DailySourceEncoder, d_model=d, nhead=cfg.nhead, num_layers=cfg.num_daily_layers, dropout=cfg.dropout,
            causal=cfg.causal, max_len=cfg.max_daily_len, policy=pol, remat=cfg.remat,
            attention_block=cfg.attention_block, defer_layers=vmap_sources,
        )
        daily = [
            daily_encoder(n_features=f, name=f"daily_encoders_{name}")(x, m, deterministic=det)
            for (name, f), x, m in zip(cfg.daily_sources, d_feats, d_masks)
        ]
        if vmap_sources:
            # The per-source embeddings differ in shape; the transformer stacks do not:
            # run them as one vmapped stack over the sources' stacked parameters.
            h, key_valid, params = (list(parts) for parts in zip(*daily))
            run = daily_layers_fn(
                num_layers=cfg.num_daily_layers, nhead=cfg.nhead, d_model=d, dropout=cfg.dropout, policy=pol,
                deterministic=det, causal=cfg.causal, attention_block=cfg.attention_block, remat=cfg.remat,
            )
            args = [stack_trees(params), jnp.stack(h), jnp.stack(key_valid)]
            if not det:
                args.append(jax.random.split(self.make_rng("dropout"), len(h)))
            stacked = jax.vmap(run)(*args)
            daily = [stacked[i] for i in range(len(h))]
        hiddens = daily

        # Stage 2: cross-source fusion and temporal source gate.
        fused, day_mask = DailyCrossSourceFusion(
            d_model=d, nhead=cfg.nhead, num_layers=cfg.num_fusion_layers, dropout=cfg.dropout,
            max_len=cfg.max_daily_len, policy=pol, name="daily_fusion",
        )(hiddens, d_masks, deterministic=det)

        # Stage 3: daily temporal encoder.
        fused = DailyTemporalEncoder(
            d_model=d, nhead=max(4, cfg.nhead // 2), dropout=cfg.dropout, window=cfg.local_window,
            max_len=cfg.max_daily_len, policy=pol, attention_block=cfg.attention_block, name="daily_temporal_encoder",
        )(fused, day_mask, deterministic=det)

        # Stage 4: daily -> monthly aggregation.
        m = bnd.shape[1]
        if m > cfg.max_months:
            raise ValueError(f"{m} months exceed max_months {cfg.max_months}")
        agg, agg_mask, _ = MonthlyAggregation(
            d_model=d, nhead=cfg.nhead, max_months=cfg.max_months, dropout=cfg.dropout, policy=pol,
            name="monthly_aggregation",
        )(fused, bnd, day_mask, deterministic=det)

        # Stage 5: monthly encoders.
        m_feats, m_tmasks = [], []
        for name in cfg.monthly_source_names:
            mask = inputs.monthly_masks[name].astype(bool)
            m_feats.append(jnp.where(mask, inputs.monthly_features[name], 0.0))
            m_tmasks.append(jnp.any(mask, axis=-1))
        if m_feats[0].shape[1] != m:
            raise ValueError("monthly window length must equal month_boundaries.shape[1]")
        monthly, source_importance = MultiSourceMonthlyEncoder(
            n_features=tuple(f for _, f in cfg.monthly_sources), d_model=d, nhead=cfg.nhead,
            num_layers=cfg.num_monthly_layers, num_fusion_layers=cfg.num_fusion_layers,
            dim_feedforward=cfg.monthly_dim_feedforward, dropout=cfg.dropout, max_months=cfg.max_months, policy=pol,
            name="monthly_encoder",
        )(m_feats, m_tmasks, deterministic=det)
        monthly_mask = jnp.any(jnp.stack(m_tmasks, 0), axis=0)

        # Stage 6: cross-resolution fusion.
        fused_monthly, maps = CrossResolutionFusion(
            d_model=d, nhead=cfg.nhead, num_layers=cfg.num_fusion_layers, dropout=cfg.dropout, policy=pol,
            name="cross_resolution_fusion",
        )(agg, monthly, agg_mask, monthly_mask, deterministic=det)

        # Stage 7: causal temporal encoder over months.
        z = TemporalEncoder(
            d_model=d, nhead=cfg.nhead, num_layers=cfg.num_temporal_layers, dropout=cfg.dropout, causal=cfg.causal,
            max_len=cfg.max_months, policy=pol, name="temporal_encoder",
        )(fused_monthly, monthly_mask, deterministic=det)

        # Stage 8: heads.
        hid = 2 * d
        mlp_head = partial(MLPHead, hidden=hid, dropout=cfg.dropout, policy=pol)
        out = {"temporal_output": z}
        out["casualty_pred"], out["casualty_var"] = CasualtyHead(
            hidden=hid, dropout=cfg.dropout, policy=pol, name="casualty_head"
        )(z, deterministic=det)
        regime_in = z
        if cfg.regime_daily_state:
            # The regime is a daily quantity: each month position also reads the daily temporal
            # encoder's state on its month's last day (the window's last day for the last month).
            last_day = jnp.clip(bnd[..., 1] - 1, 0, t - 1)
            day_state = jnp.take_along_axis(fused, last_day[..., None], axis=1)
            regime_in = jnp.concatenate([z, day_state.astype(z.dtype)], axis=-1)
        out["regime_logits"] = mlp_head(hidden2=hid // 2, out=cfg.n_regime_classes, name="regime_head")(
            regime_in, deterministic=det
        )
        out["anomaly_score"] = mlp_head(hidden2=hid // 2, out=1, name="anomaly_head")(z, deterministic=det)
        if cfg.transition_head:
            # A transition is a change of regime: its head reads what the regime head reads.
            out["transition_logit"] = mlp_head(hidden2=hid // 2, out=1, name="transition_head")(
                regime_in, deterministic=det)
        out["forecast_pred"] = mlp_head(hidden2=hid, out=cfg.n_monthly_features, name="forecast_head")(
            z, deterministic=det
        )
        if cfg.forecast_residual:
            # Position m forecasts month m + 1 in the same normalised units as the inputs. The gain
            # starts at 1 (persistence) and is learnt per feature: a persistent series keeps ~1, a
            # noisy stationary one moves towards 0 (climatology); a fixed 1 made the head undo the
            # current value through the stack for those (sentinel val MSE 2.07 vs climatology 1.25).
            # Adam moves a parameter by about the learning rate per step, so a plain gain travelled
            # ~0.2 in the main job's 340 steps. The stored parameter is the gain's change over
            # _GAIN_SCALE, a per-parameter step multiplier. Main job, food prices (level noise, where
            # climatology is best: train MSE 0.94): train MSE 1.35 with a plain gain, 1.03 at scale
            # 10, 0.93 at 30.
            raw = self.param("forecast_persistence_gain", nn.initializers.zeros, (cfg.n_monthly_features,),
                             jnp.float32)
            gain = 1.0 + _GAIN_SCALE * raw
            current = jnp.concatenate(m_feats, axis=-1).astype(out["forecast_pred"].dtype)
            out["forecast_pred"] = out["forecast_pred"] + gain.astype(current.dtype) * current
        if cfg.use_latent_forecast:
            out["daily_forecast_pred"] = LatentStatePredictor(
                d_model=d, horizon=cfg.daily_forecast_horizon, hidden=hid, dropout=cfg.dropout, policy=pol,
                name="daily_forecast_head",
            )(z, deterministic=det)
        else:
            out["daily_forecast_pred"] = DailyForecastingHead(
                horizon=cfg.daily_forecast_horizon, out=cfg.n_daily_features, hidden=hid, dropout=cfg.dropout,
                policy=pol, name="daily_forecast_head",
            )(z, deterministic=det)
        out["source_importance"] = source_importance
        density = observation_density([jnp.any(x, axis=-1) for x in d_masks], m_tmasks, bnd)
        out["uncertainty"] = UncertaintyEstimator(hidden=d // 2, policy=pol, name="uncertainty_estimator")(z, density)
        if cfg.return_attention:
            for layer, pair in maps.items():
                for direction, probs in pair.items():
                    out[f"cross_resolution_attention/{layer}/{direction}"] = probs
        return {k: v.astype(pol.output_dtype) for k, v in out.items()}
