"""The count-aware feature transform, applied to the aligned daily values before the train-only fit.

Stage of ``build_datasets``: ``transform_sources`` runs between ``align_sources``
and ``fit_norm_stats``, so the fitted statistics, the normalised inputs of every
split and the forecast targets built from them are all on the transformed scale.

``DataConfig.count_transform`` (a han-jax addition; the original has no transform):

* ``"none"``: values pass through unchanged (the original's behaviour, bit for bit).
* ``"log1p"``: signed log1p, ``sign(x) * log1p(|x|)``, on every count-like daily
  feature. Signed because deltas of cumulative counters can be negative after a
  correction, and the acceleration / momentum features are differences.

Which features are count-like: every daily feature except the ratios listed in
``features.RATIO_FEATURES`` (``personnel_pct_change_7d`` and ``intensity_ratio``,
dimensionless and already clipped to +-5 by the feature engineering). All the other
daily loss features are counts or count-scale statistics of the deltas (daily
deltas, rolling means, rolling stds, acceleration, momentum); none is already
logged. A monthly source built from the daily counts (``SourceTable.counts``: the
real data's ``personnel_monthly`` and ``equipment_monthly``) is transformed whole,
so its values, the forecast head's targets, grow on the scale of the inputs; other
monthly sources are not. Missing values (NaN, and a value equal to the missing-value
sentinel) are left as they are, so the masks do not change.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from han_jax.data.alignment import AlignedSources, SourceSelection
from han_jax.data.features import RATIO_FEATURES
from han_jax.data.world import DataError

COUNT_TRANSFORMS: Tuple[str, ...] = ("none", "log1p")


def check_count_transform(value) -> str:
    """The configured transform's name; raises a one-line ``DataError`` for an unknown one.

    ``None`` reads as ``"none"`` (what ``--set data.count_transform=none`` parses to).
    """
    name = "none" if value is None else value
    if name not in COUNT_TRANSFORMS:
        allowed = ", ".join(repr(v) for v in COUNT_TRANSFORMS)
        raise DataError(f"DataConfig.count_transform={value!r}; expected one of {allowed}")
    return name


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """``sign(x) * log1p(|x|)``: odd, monotone, 0 -> 0, NaN -> NaN."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.log1p(np.abs(x))


def inverse_signed_log1p(y: np.ndarray) -> np.ndarray:
    """``sign(y) * expm1(|y|)``: the exact inverse of :func:`signed_log1p` (NaN -> NaN; beyond float64, +-inf)."""
    y = np.asarray(y, np.float64)
    with np.errstate(over="ignore"):
        return np.sign(y) * np.expm1(np.abs(y))


def invert_count_transform(x: np.ndarray, transformed: np.ndarray, method: str) -> np.ndarray:
    """Undo the count transform on the last axis's features where ``transformed`` is True.

    Args:
      x: values on the transformed scale, ``[..., F]``.
      transformed: bool ``[F]``, the features the transform was applied to.
      method: the transform's name (``COUNT_TRANSFORMS``).

    Returns:
      float64 ``[..., F]`` on the data's original scale.
    """
    method = check_count_transform(method)
    x = np.asarray(x, np.float64)
    if method == "none":
        return x
    return np.where(np.asarray(transformed, bool), inverse_signed_log1p(x), x)


def count_feature_mask(feature_names) -> np.ndarray:
    """bool ``[F]``: True for the features the transform applies to (all but the ratio features)."""
    return np.array([n not in RATIO_FEATURES for n in feature_names], bool)


@dataclasses.dataclass(frozen=True)
class TransformedSources:
    """The aligned sources after the transform, and which daily features it touched (True = transformed)."""

    aligned: AlignedSources
    method: str
    daily_features: Dict[str, np.ndarray]  # bool [F] per daily source
    skipped: Tuple[str, ...]  # names of the selected daily features the transform leaves alone
    monthly_features: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # bool [F] per monthly source

    def describe(self) -> str:
        """One line for the datasets' report."""
        if self.method == "none":
            return "count transform: none (daily features z-scored on their raw scale, as the original)"
        n = sum(int(m.sum()) for m in self.daily_features.values())
        total = sum(len(m) for m in self.daily_features.values())
        keep = f"; left as they are (ratios): {', '.join(self.skipped)}" if self.skipped else ""
        counted = [name for name, m in self.monthly_features.items() if m.any()]
        monthly = (f"; also the monthly sources built from daily counts ({', '.join(counted)}), forecast targets "
                   "included" if counted else "; monthly sources untransformed")
        return (f"count transform: {self.method}, sign(x) * log1p(|x|) on {n} of {total} daily features "
                f"before the train-only fit{keep}{monthly}")


def transform_sources(
    aligned: AlignedSources, sources: SourceSelection, *, method: str, missing_value: float
) -> TransformedSources:
    """Apply the configured count transform to the count-like daily features (see the module docstring).

    ``method="none"`` returns the input arrays themselves (no copy, so nothing changes).
    """
    method = check_count_transform(method)
    if method == "none":
        none = {n: np.zeros(sources.daily[n].n_features, bool) for n in sources.daily_names}
        monthly_none = {n: np.zeros(sources.monthly[n].n_features, bool) for n in sources.monthly_names}
        return TransformedSources(aligned, method, none, (), monthly_none)
    touched = {n: count_feature_mask(sources.daily[n].feature_names) for n in sources.daily_names}
    monthly_touched = {n: np.full(sources.monthly[n].n_features, bool(sources.monthly[n].counts))
                       for n in sources.monthly_names}
    skipped = tuple(dict.fromkeys(
        f for n in sources.daily_names for f, t in zip(sources.daily[n].feature_names, touched[n]) if not t))
    def apply(arrays, masks):
        out = {}
        for n, x in arrays.items():
            where = masks[n][None, :] & ~np.isnan(x) & (x != missing_value)
            out[n] = np.where(where, signed_log1p(x), x)
        return out

    transformed = dataclasses.replace(aligned, daily=apply(aligned.daily, touched),
                                      monthly=apply(aligned.monthly, monthly_touched))
    return TransformedSources(transformed, method, touched, skipped, monthly_touched)
