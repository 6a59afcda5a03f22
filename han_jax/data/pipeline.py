"""``build_datasets``: a world -> aligned, normalised, anchored train/val/test splits.

``build_datasets(world, config)`` runs the original's ``MultiResolutionDataset``
steps (docs/data.md sections 1.4, 2, 4, 5) once for all three splits and returns
precomputed arrays; windows are gathered per batch by ``iterate_batches``.

Its stages, one module per concern:

* ``alignment``: ``select_sources`` -> ``data_calendar`` -> ``align_sources``
* ``splits``: ``split_day_ranges`` (train must end before statistics are fitted)
* ``transform``: ``transform_sources`` (``DataConfig.count_transform``, before the fit)
* ``normalisation``: ``fit_norm_stats`` (train only) -> ``normalise_sources``
* ``target_tables``: ``forecast_table``, ``target_tables``
* ``splits``: ``split_anchors`` -> ``assemble_split`` (per split)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, List, Tuple

from han_jax.config import DataConfig
from han_jax.data.alignment import (
    Calendar,
    Layout,
    SourceSelection,
    align_sources,
    data_calendar,
    make_calendar,
    select_sources,
)
from han_jax.data.normalisation import NormStats, fit_norm_stats, normalise_sources
from han_jax.data.splits import ArrayStore, SplitData, assemble_split, split_anchors, split_day_ranges
from han_jax.data.target_tables import forecast_table, target_tables
from han_jax.data.transform import TransformedSources, check_count_transform, transform_sources
from han_jax.data.world import DataError, World, note

__all__ = [
    "ArrayStore", "Calendar", "Datasets", "NormStats", "SplitData", "build_datasets", "check_config", "make_calendar",
]


@dataclasses.dataclass
class Datasets:
    train: SplitData
    val: SplitData
    test: SplitData
    stats: NormStats
    calendar: Calendar
    daily_sources: Layout
    monthly_sources: Layout
    config: DataConfig
    info: dict
    report: List[str]

    @property
    def splits(self) -> Dict[str, SplitData]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def model_layout(self) -> dict:
        """``ModelConfig`` keyword arguments for this data's source layout."""
        return {"daily_sources": self.daily_sources, "monthly_sources": self.monthly_sources}


def build_datasets(world: World, config: DataConfig = DataConfig()) -> Datasets:
    """Align, mask, normalise (train-only), anchor and split a world.

    Deliberate differences from the original: bad inputs raise ``DataError``
    instead of warning; ``embargo_days`` (default 0, i.e. the original) can
    drop that many anchor days at the start of val and of test; ``count_transform``
    ("none" by default, i.e. the original) can log-compress the daily counts
    before the fit; ``val_sample_stride`` defaults to 1 (every valid day) instead
    of the original's automatic stride (``None``).
    """
    cfg = config
    check_config(cfg)
    world.validate()
    sources = select_sources(world, daily=cfg.daily_sources, monthly=cfg.monthly_sources)
    _check_prediction_horizon(cfg.prediction_horizon)
    cal = data_calendar(
        sources.all_dates(), start_date=cfg.start_date, end_date=cfg.end_date,
        daily_seq_len=cfg.daily_seq_len, monthly_seq_len=cfg.monthly_seq_len,
    )
    ranges = split_day_ranges(
        cal.n_days, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio, embargo_days=cfg.embargo_days
    )
    aligned = align_sources(sources, cal)
    transformed = transform_sources(aligned, sources, method=cfg.count_transform, missing_value=cfg.missing_value)
    aligned = transformed.aligned
    stats = fit_norm_stats(
        aligned, cal, train_end=ranges["train"][1], whole_train_months=cfg.norm_whole_train_months,
        std_floor=cfg.std_floor,
    )
    normalised = normalise_sources(aligned, stats, missing_value=cfg.missing_value)
    store = ArrayStore(
        daily=normalised.daily,
        daily_masks=normalised.daily_masks,
        monthly=normalised.monthly,
        monthly_masks=normalised.monthly_masks,
        daily_sources=sources.daily_layout,
        monthly_sources=sources.monthly_layout,
        daily_seq_len=cfg.daily_seq_len,
        monthly_seq_len=cfg.monthly_seq_len,
        missing_value=cfg.missing_value,
        daily_forecast_horizon=cfg.daily_forecast_horizon if cfg.daily_forecast_targets else None,
    )
    forecast = forecast_table(normalised, sources, cal)
    targets = target_tables(world, cal)
    anchors = split_anchors(
        cal, ranges, daily_seq_len=cfg.daily_seq_len, monthly_seq_len=cfg.monthly_seq_len,
        prediction_horizon=cfg.prediction_horizon, val_sample_stride=cfg.val_sample_stride,
    )
    splits = {
        name: assemble_split(a, calendar=cal, store=store, targets=targets, forecast=forecast,
                             prediction_horizon=cfg.prediction_horizon)
        for name, a in anchors.items()
    }
    return _datasets(world, cfg, sources, cal, ranges, stats.combined(), splits, transformed)


def check_config(cfg: DataConfig) -> None:
    """The checks of a ``DataConfig`` that need no data (run before any world is built or loaded)."""
    check_count_transform(cfg.count_transform)
    s = cfg.val_sample_stride
    if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1):
        raise DataError(
            f"DataConfig.val_sample_stride={s!r}; expected an int >= 1, or None for the original's automatic stride"
        )


def _check_prediction_horizon(h: int) -> None:
    if h < 1:
        raise DataError(f"prediction_horizon={h}; expected >= 1")


def _datasets(
    world: World,
    cfg: DataConfig,
    sources: SourceSelection,
    cal: Calendar,
    ranges: Dict[str, Tuple[int, int]],
    stats: NormStats,
    splits: Dict[str, SplitData],
    transformed: TransformedSources,
) -> Datasets:
    """The ``Datasets`` with its ``info`` summary, reporting the split sizes."""
    n_days, n_months = cal.n_days, cal.n_months
    d_layout, m_layout = sources.daily_layout, sources.monthly_layout
    info = {
        "n_days": n_days,
        "n_months": n_months,
        "start": str(cal.start),
        "end": str(cal.end),
        "split_days": {k: (int(a), int(b)) for k, (a, b) in ranges.items()},
        "split_dates": {
            k: (str(cal.day_dates[a]) if a < n_days else None, str(cal.day_dates[b - 1]) if b > a else None)
            for k, (a, b) in ranges.items()
        },
        "anchors": {k: len(s) for k, s in splits.items()},
        "stride": {k: s.stride for k, s in splits.items()},
        "daily_sources": d_layout,
        "monthly_sources": m_layout,
        "world": world.name,
        "count_transform": transformed.method,
    }
    report = list(world.report)
    note(
        report,
        f"datasets from '{world.name}': {n_days} days / {n_months} months ({cal.start}..{cal.end}); "
        f"anchors train={len(splits['train'])} val={len(splits['val'])} (stride {splits['val'].stride}) "
        f"test={len(splits['test'])} (stride {splits['test'].stride})",
    )
    note(report, transformed.describe())
    return Datasets(splits["train"], splits["val"], splits["test"], stats, cal, d_layout, m_layout, cfg, info, report)
