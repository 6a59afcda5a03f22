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

``build_inference_windows(world, config, normalisation, layout, ...)`` runs the
same stages on new data for prediction: no split and no refit (a run's saved
:class:`Normalisation` is applied), and an anchor needs only its input window.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, List, Tuple

import numpy as np

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
from han_jax.data.layout import DataLayout, check_layout, layout_of
from han_jax.data.loss_records import check_implausible_values
from han_jax.data.normalisation import (
    Normalisation,
    NormalisedSources,
    NormStats,
    fit_norm_stats,
    normalise_sources,
)
from han_jax.data.splits import (
    ArrayStore,
    SplitAnchors,
    SplitData,
    assemble_split,
    split_anchors,
    split_day_ranges,
)
from han_jax.data.target_tables import forecast_table, target_tables
from han_jax.data.transform import TransformedSources, check_count_transform, transform_sources
from han_jax.data.vintage import check_publication_lags, parse_origin
from han_jax.data.world import DataError, World, note, parse_day

__all__ = [
    "ArrayStore", "Calendar", "Datasets", "InferenceWindows", "NormStats", "SplitData", "build_datasets",
    "build_inference_windows", "check_config", "make_calendar", "parse_day",
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
    # What a run saves to predict on new data later (norm_stats.npz, layout.json).
    normalisation: Normalisation
    layout: DataLayout

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
    store = _array_store(normalised, sources, cfg)
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
    normalisation = Normalisation(transformed.method, transformed.daily_features, stats, transformed.monthly_features)
    return _datasets(world, cfg, sources, cal, ranges, normalisation, splits, transformed)


@dataclasses.dataclass
class InferenceWindows:
    """Anchors of new data to predict from, normalised with a run's saved statistics.

    Attributes:
      split: a :class:`SplitData` named ``"predict"`` (``iterate_batches`` and the
        steps take it as any split); its targets are valid where the data has them.
      calendar: the new data's calendar.
      dates: datetime64[D] ``[N]``, the anchor days (each the last day of its window).
      report: what was done (one line each).
    """

    split: SplitData
    calendar: Calendar
    dates: np.ndarray
    report: List[str]


def build_inference_windows(
    world: World,
    config: DataConfig,
    normalisation: Normalisation,
    layout: DataLayout,
    date_from=None,
    date_to=None,
) -> InferenceWindows:
    """Every anchor of ``world`` in ``[date_from, date_to]``, windowed and normalised as the run's data was.

    The stages of :func:`build_datasets` without its split and its fit: the data
    is checked against the run's ``layout``, transformed with the saved count
    transform and z-scored with the saved train statistics (never refitted). An
    anchor needs only its input window (``daily_seq_len`` days and
    ``monthly_seq_len`` months ending on it); it needs no target and no next
    month, so anchors after the training data's end are the normal case.
    ``config.end_date`` is not applied (it cut the training data; new data is
    used to its last day).

    Args:
      world: the new data (same sources and features as the run's, in order).
      config: the run's ``DataConfig`` (windows, source selection, start date, sentinel).
      normalisation: the run's saved :class:`Normalisation`.
      layout: the run's saved :class:`DataLayout`.
      date_from: the first anchor day (``YYYY-MM-DD``); default ``date_to``.
      date_to: the last anchor day; default the data's last day.

    Returns:
      The :class:`InferenceWindows`.

    Raises:
      DataError: a layout that differs from the run's (naming the source or feature),
        a date outside the data or not a date, or a range with no anchor whose window fits.
    """
    cfg = config
    check_config(cfg)
    # Bad dates fail before the data is aligned.
    first = parse_day(date_from, "date_from") if date_from is not None else None
    last = parse_day(date_to, "date_to") if date_to is not None else None
    world.validate()
    sources = select_sources(world, daily=cfg.daily_sources, monthly=cfg.monthly_sources)
    check_layout(layout, layout_of(sources), where=f"data '{world.name}'")
    cal = data_calendar(sources.all_dates(), start_date=cfg.start_date, end_date=None,
                        daily_seq_len=cfg.daily_seq_len, monthly_seq_len=cfg.monthly_seq_len)
    transformed = transform_sources(align_sources(sources, cal), sources, method=normalisation.count_transform,
                                    missing_value=cfg.missing_value)
    for kind, now, saved in (("daily", transformed.daily_features, normalisation.transformed),
                             ("monthly", transformed.monthly_features, normalisation.monthly_transformed)):
        for name, touched in now.items():
            if not np.array_equal(touched, saved.get(name, np.zeros_like(touched))):
                raise DataError(f"{kind} source '{name}': the count transform would touch other features than the "
                                "run's saved statistics record; expected the han-jax version that trained the run")
    normalised = normalise_sources(transformed.aligned, normalisation.stats, missing_value=cfg.missing_value)
    store = _array_store(normalised, sources, cfg)
    days = _anchor_days(cal, first, last, daily_seq_len=cfg.daily_seq_len, monthly_seq_len=cfg.monthly_seq_len)
    split = assemble_split(SplitAnchors("predict", days, 1, (int(days[0]), int(days[-1]) + 1)), calendar=cal,
                           store=store, targets=target_tables(world, cal),
                           forecast=forecast_table(normalised, sources, cal),
                           prediction_horizon=cfg.prediction_horizon)
    report = list(world.report)
    note(report, f"prediction anchors from '{world.name}': {len(days)} ({cal.day_dates[days[0]]}.."
                 f"{cal.day_dates[days[-1]]}); data {cal.start}..{cal.end}; the run's saved normalisation "
                 f"(count transform {normalisation.count_transform}, train statistics), not refitted")
    return InferenceWindows(split, cal, cal.day_dates[days], report)


def _anchor_days(cal: Calendar, first, last, *, daily_seq_len: int, monthly_seq_len: int) -> np.ndarray:
    """Day indices in ``[first, last]`` whose window fits (see :func:`build_inference_windows`); None: the defaults."""
    last = cal.end if last is None else last
    first = last if first is None else first
    if last > cal.end or last < cal.start:
        raise DataError(f"date_to={last}: the data covers {cal.start}..{cal.end}; expected a day inside it")
    if first > last:
        raise DataError(f"date_from={first} is after date_to={last}")
    days = np.arange(cal.n_days)
    fits = (days - daily_seq_len + 1 >= 0) & (cal.month_of_day - monthly_seq_len + 1 >= 0)
    in_range = (cal.day_dates >= first) & (cal.day_dates <= last)
    chosen = days[fits & in_range]
    if len(chosen) == 0:
        first_ok = cal.day_dates[np.flatnonzero(fits)[0]] if fits.any() else None
        raise DataError(f"no anchor in {first}..{last}: a window needs {daily_seq_len} days and {monthly_seq_len} "
                        f"months of data ending on its anchor; the first day that has them is {first_ok}")
    return chosen


def _array_store(normalised: NormalisedSources, sources: SourceSelection, cfg: DataConfig) -> ArrayStore:
    """The calendar arrays batches are gathered from."""
    return ArrayStore(
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


def check_config(cfg: DataConfig) -> None:
    """The checks of a ``DataConfig`` that need no data (run before any world is built or loaded)."""
    check_count_transform(cfg.count_transform)
    check_implausible_values(cfg.implausible_values)
    if cfg.known_at is not None:
        parse_origin(cfg.known_at)
    check_publication_lags(cfg.publication_lags)
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
    normalisation: Normalisation,
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
    return Datasets(splits["train"], splits["val"], splits["test"], normalisation.stats.combined(), cal, d_layout,
                    m_layout, cfg, info, report, normalisation, layout_of(sources))
