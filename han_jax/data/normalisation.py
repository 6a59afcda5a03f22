"""Train-only normalisation (docs/data.md section 2.6).

Stages of ``build_datasets``: ``fit_norm_stats`` -> ``normalise_sources``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Tuple

import numpy as np

from han_jax.data.alignment import AlignedSources, Calendar
from han_jax.data.transform import check_count_transform, invert_count_transform
from han_jax.data.world import DataError

NORM_FORMAT = 1


@dataclasses.dataclass
class NormStats:
    """Train-only per-feature statistics, per source (std already floored)."""

    mean: Dict[str, np.ndarray]
    std: Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainStats:
    """The fitted statistics, kept per kind so a daily and a monthly source may share a name."""

    daily: NormStats
    monthly: NormStats

    def combined(self) -> NormStats:
        """One ``NormStats`` over all sources (daily first; on a shared name the monthly statistics win)."""
        return NormStats({**self.daily.mean, **self.monthly.mean}, {**self.daily.std, **self.monthly.std})


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """How raw source values became model inputs: the count transform, then the train-only z-score.

    A run saves it (``norm_stats.npz``) so that new data is normalised exactly as
    its training data was, and predictions can be taken back to the data's units;
    it is never refitted on the new data.

    Attributes:
      count_transform: the ``DataConfig.count_transform`` that was applied (``"none"`` or ``"log1p"``).
      transformed: ``{daily source: bool [F]}``, True for the features the transform touched.
      stats: the train-only statistics, of the transformed values.
      monthly_transformed: ``{monthly source: bool [F]}``, the same for the monthly sources built
        from daily counts (``han_jax.data.transform``); empty or all False for the others.
    """

    count_transform: str
    transformed: Dict[str, np.ndarray]
    stats: TrainStats
    monthly_transformed: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """Named arrays for ``np.savez`` (``daily/<source>/mean`` and so on; source order in ``*_sources``)."""
        out = {"format": np.array(NORM_FORMAT), "count_transform": np.array(self.count_transform),
               "daily_sources": np.array(list(self.stats.daily.mean), dtype=str),
               "monthly_sources": np.array(list(self.stats.monthly.mean), dtype=str)}
        for kind, st in (("daily", self.stats.daily), ("monthly", self.stats.monthly)):
            for name in st.mean:
                out[f"{kind}/{name}/mean"] = np.asarray(st.mean[name], np.float64)
                out[f"{kind}/{name}/std"] = np.asarray(st.std[name], np.float64)
                touched = self.transformed if kind == "daily" else self.monthly_transformed
                out[f"{kind}/{name}/transformed"] = np.asarray(
                    touched.get(name, np.zeros(np.shape(st.mean[name]), bool)), bool)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, where: str = "norm stats") -> "Normalisation":
        """Rebuilds :meth:`to_arrays`' output; anything missing or malformed is a one-line ``DataError``."""
        def get(key):
            if key not in arrays:
                raise DataError(f"{where}: no array '{key}'; expected the statistics written by han-jax")
            return np.asarray(arrays[key])

        if int(get("format")) != NORM_FORMAT:
            raise DataError(f"{where}: format {int(get('format'))}; expected {NORM_FORMAT}")
        method = check_count_transform(str(get("count_transform")))
        stats, transformed, monthly_transformed = {}, {}, {}
        for kind in ("daily", "monthly"):
            st = NormStats({}, {})
            for name in get(f"{kind}_sources").tolist():
                st.mean[name], st.std[name] = get(f"{kind}/{name}/mean"), get(f"{kind}/{name}/std")
                if st.mean[name].shape != st.std[name].shape or st.mean[name].ndim != 1:
                    raise DataError(f"{where}: {kind} source '{name}': mean {st.mean[name].shape} and std "
                                    f"{st.std[name].shape}; expected two equal 1-D shapes")
                if kind == "daily":
                    transformed[name] = get(f"{kind}/{name}/transformed").astype(bool)
                else:
                    # Statistics saved before monthly sources could be transformed have no such array: none was.
                    key = f"monthly/{name}/transformed"
                    monthly_transformed[name] = (np.asarray(arrays[key]).astype(bool) if key in arrays
                                                 else np.zeros(st.mean[name].shape, bool))
            stats[kind] = st
        return cls(method, transformed, TrainStats(stats["daily"], stats["monthly"]), monthly_transformed)

    def to_original_units(self, kind: str, source: str, z: np.ndarray) -> np.ndarray:
        """Normalised values of one source's features ``[..., F]`` back in the data's units (float64).

        The z-score is undone with the saved statistics, then the count transform
        where it was applied (signed log1p is invertible: ``sign(y) * expm1(|y|)``).
        """
        st = getattr(self.stats, kind)
        x = np.asarray(z, np.float64) * st.std[source] + st.mean[source]
        touched = self.transformed if kind == "daily" else self.monthly_transformed
        if source in touched:
            x = invert_count_transform(x, touched[source], self.count_transform)
        return x


@dataclasses.dataclass(frozen=True)
class NormalisedSources:
    """Normalised float32 arrays with the missing-value sentinel, and per-feature masks (True = observed)."""

    daily: Dict[str, np.ndarray]  # float32 [n_days, F]
    daily_masks: Dict[str, np.ndarray]  # bool [n_days, F]
    monthly: Dict[str, np.ndarray]  # float32 [n_months, F]
    monthly_masks: Dict[str, np.ndarray]  # bool [n_months, F]


def fit_norm_stats(
    aligned: AlignedSources,
    calendar: Calendar,
    *,
    train_end: int,
    whole_train_months: bool,
    std_floor: float,
) -> TrainStats:
    """Per-feature nanmean / nanstd (ddof 0) of each source over train rows only; all-NaN -> (0, 1).

    Train rows are the observed rows among days ``< train_end`` and months that end
    by then; with ``whole_train_months`` (the original's quirk) they are every day
    and every month touched by train days. ``std`` is floored at ``std_floor``.
    """
    n_days, n_months = calendar.n_days, calendar.n_months
    train_months = np.unique(calendar.month_of_day[:train_end])
    if whole_train_months:
        # Quirk kept: every day of every month touched by train, so up to ~30 val days leak in.
        day_rows = np.isin(calendar.month_of_day, train_months)
        month_rows = np.arange(n_months) < len(train_months)
    else:
        day_rows = np.arange(n_days) < train_end
        month_rows = calendar.month_bounds[:, 1] <= train_end
    daily = NormStats({}, {})
    for n, x in aligned.daily.items():
        daily.mean[n], daily.std[n] = _fit_stats(x, day_rows & aligned.daily_rows[n], std_floor)
    monthly = NormStats({}, {})
    for n, x in aligned.monthly.items():
        monthly.mean[n], monthly.std[n] = _fit_stats(x, month_rows & aligned.monthly_rows[n], std_floor)
    return TrainStats(daily, monthly)


def normalise_sources(aligned: AlignedSources, stats: TrainStats, *, missing_value: float) -> NormalisedSources:
    """z-score every aligned source with its train statistics; missing -> ``missing_value``, masked out."""
    store_d, mask_d, store_m, mask_m = {}, {}, {}, {}
    d, m = stats.daily, stats.monthly
    for n, x in aligned.daily.items():
        store_d[n], mask_d[n] = _normalise(x, aligned.daily_rows[n], d.mean[n], d.std[n], missing_value)
    for n, x in aligned.monthly.items():
        store_m[n], mask_m[n] = _normalise(x, aligned.monthly_rows[n], m.mean[n], m.std[n], missing_value)
    return NormalisedSources(store_d, mask_d, store_m, mask_m)


def _fit_stats(x: np.ndarray, rows: np.ndarray, floor: float) -> Tuple[np.ndarray, np.ndarray]:
    """nanmean / nanstd (ddof=0) over the selected rows; all-NaN -> (0, 1); std floored."""
    sel = x[rows]
    f = x.shape[1]
    if sel.shape[0] == 0:
        return np.zeros(f), np.maximum(np.ones(f), floor)
    cnt = np.sum(~np.isnan(sel), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(sel, axis=0) / cnt
        var = np.nansum((sel - mean) ** 2, axis=0) / cnt
    mean = np.where(cnt > 0, mean, 0.0)
    std = np.where(cnt > 0, np.sqrt(var), 1.0)
    return mean, np.maximum(std, floor)


def _normalise(x: np.ndarray, row_mask: np.ndarray, mean, std, missing: float):
    z = ((x - mean) / std).astype(np.float32)
    z = np.where(np.isnan(z), np.float32(missing), z)
    mask = row_mask[:, None] & (z != missing)
    return z, mask
