"""Fixed-shape numpy batches ``(Inputs, Targets)`` from a split.

Every batch has exactly ``batch_size`` rows: the last partial batch is padded with
rows whose features are 0, masks False, boundaries ``[0, 0]`` and
``sample_mask`` False, so nothing is dropped and a jitted step never recompiles.
Windows are gathered with one fancy-index per source (no Python loop over days).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from han_jax.core.batch import Inputs, Targets
from han_jax.data.splits import SplitData
from han_jax.data.world import DataError


def num_batches(split: SplitData, batch_size: int) -> int:
    return -(-len(split) // batch_size)


def gather(split: SplitData, rows: np.ndarray, valid: Optional[np.ndarray] = None) -> Tuple[Inputs, Targets]:
    """Build one batch from split rows; rows where ``valid`` is False become padding."""
    st = split.store
    rows = np.asarray(rows, np.int64)
    B = len(rows)
    valid = np.ones(B, bool) if valid is None else np.asarray(valid, bool)
    anchors = split.anchors[rows]
    months = split.anchor_months[rows]
    T, M = st.daily_seq_len, st.monthly_seq_len
    d_idx = anchors[:, None] + np.arange(-T + 1, 1)[None, :]
    m_idx = months[:, None] + np.arange(-M + 1, 1)[None, :]
    v3 = valid[:, None, None]

    def _take(store, masks, idx):
        feats, msk = {}, {}
        for name in store:
            m = masks[name][idx] & v3
            # The model never sees the -999 sentinel: missing is 0 and the mask says so.
            feats[name] = np.where(m, store[name][idx], np.float32(0.0))
            msk[name] = m
        return feats, msk

    df, dm = _take(st.daily, st.daily_masks, d_idx)
    mf, mm = _take(st.monthly, st.monthly_masks, m_idx)
    inputs = Inputs(
        daily_features=df,
        daily_masks=dm,
        monthly_features=mf,
        monthly_masks=mm,
        month_boundaries=np.where(v3, split.month_boundaries[rows], 0).astype(np.int32),
    )

    tg = split.targets

    def t(key, dtype):
        if key not in tg:
            return None
        x = tg[key][rows]
        pad = valid.reshape((B,) + (1,) * (x.ndim - 1))
        return np.where(pad, x, 0).astype(dtype)

    dft = dfm = None
    if st.daily_forecast_horizon:
        dft, dfm = _daily_forecast(split, anchors, valid)
    targets = Targets(
        phase_index=np.where(valid, tg["phase_index"][rows], 0).astype(np.int32),
        phase_valid=t("phase_valid", bool),
        is_transition=t("is_transition", bool),
        fatalities=t("fatalities", np.float32),
        casualty_valid=t("casualty_valid", bool),
        anomaly=t("anomaly", np.float32),
        anomaly_valid=t("anomaly_valid", bool),
        forecast_targets=t("forecast_targets", np.float32),
        forecast_masks=t("forecast_masks", bool),
        sample_mask=valid.copy(),
        daily_forecast_targets=dft,
        daily_forecast_masks=dfm,
        daily_obs_rate=t("daily_obs_rate", np.float32),
        monthly_obs_rate=t("monthly_obs_rate", np.float32),
    )
    return inputs, targets


def _daily_forecast(split: SplitData, anchors, valid):
    """Days t+1..t+H of every daily source, in sorted source-name order as the original.

    Like the original, a horizon that runs past the end invalidates the whole
    sample's block (not just the tail).
    """
    st = split.store
    H = st.daily_forecast_horizon
    n_days = next(iter(st.daily.values())).shape[0]
    idx = anchors[:, None] + np.arange(1, H + 1)[None, :]
    ok = (anchors + H < n_days) & valid
    idx = np.clip(idx, 0, n_days - 1)
    vals, masks = [], []
    for name in sorted(st.daily):
        m = st.daily_masks[name][idx] & ok[:, None, None]
        vals.append(np.where(m, st.daily[name][idx], np.float32(0.0)))
        masks.append(m)
    return np.concatenate(vals, axis=2).astype(np.float32), np.concatenate(masks, axis=2)


def iterate_batches(
    split: SplitData,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rows: Optional[slice] = None,
) -> Iterator[Tuple[Inputs, Targets]]:
    """Yield ``(Inputs, Targets)`` batches of exactly ``batch_size`` rows.

    ``shuffle`` permutes rows with a generator seeded by ``(seed, epoch)``, so an
    epoch's order is reproducible. With ``rows``, only those rows of each batch are
    gathered and yielded (one process's share of a global batch: every process draws the
    same order). Laying a batch out for several devices is
    :mod:`han_jax.training.devices`' job.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}; expected >= 1")
    n = len(split)
    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    for b in range(num_batches(split, batch_size)):
        picked = order[b * batch_size : (b + 1) * batch_size]
        k = len(picked)
        valid = np.ones(batch_size, bool)
        if k < batch_size:
            valid[k:] = False
            picked = np.concatenate([picked, np.zeros(batch_size - k, np.int64)])
        if rows is not None:
            picked, valid = picked[rows], valid[rows]
        yield gather(split, picked, valid)
