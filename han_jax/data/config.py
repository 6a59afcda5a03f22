"""Configuration of the data pipeline (the original's defaults, data.md sections 2, 4 and 6)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from han_jax.config import (
    DAILY_SOURCES,
    MONTHLY_SOURCES,
    SMALL_DAILY_SOURCES,
    SMALL_MONTHLY_SOURCES,
)

MISSING_VALUE = -999.0

# A source selection entry is a name, or a (name, n_features) pair whose count is
# checked against the data.
SourceSpec = Union[str, Tuple[str, int]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how to cut it into samples.

    ``daily_sources`` / ``monthly_sources`` select and order the world's sources;
    ``None`` takes every source of the world in its own order. Entries may be names
    or ``(name, n_features)`` pairs; a pair whose count differs from the data is an
    error (the layout the model was built for would not match).

    han-jax additions (all off / neutral by default, so the defaults reproduce the
    original): ``embargo_days`` (a gap of anchor days dropped at the start of val
    and of test), ``daily_forecast_targets`` (keep the 7-day targets the original's
    collate drops), ``norm_whole_train_months=False`` (fit daily statistics on train
    days only instead of every day of every month touched by train).
    """

    # Where the world comes from (used by ``make_world``).
    source: str = "synthetic"  # "synthetic" | "losses"
    mode: str = "learnable"  # synthetic: "learnable" | "realistic"
    preset: str = "default"  # synthetic: "default" | "small"
    losses_dir: Optional[str] = None
    monthly_csv_dir: Optional[str] = None
    n_days: Optional[int] = None  # synthetic length; None = the preset's

    daily_sources: Optional[Tuple[SourceSpec, ...]] = DAILY_SOURCES
    monthly_sources: Optional[Tuple[SourceSpec, ...]] = MONTHLY_SOURCES

    start_date: str = "2022-02-24"
    end_date: Optional[str] = None
    daily_seq_len: int = 365
    monthly_seq_len: int = 12
    prediction_horizon: int = 1
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    val_sample_stride: Optional[int] = None  # None = the original's automatic stride
    embargo_days: int = 0
    std_floor: float = 0.1
    missing_value: float = MISSING_VALUE
    norm_whole_train_months: bool = True
    daily_forecast_targets: bool = False
    daily_forecast_horizon: int = 7
    seed: int = 42

    @classmethod
    def small(cls, **overrides) -> "DataConfig":
        """The fast test preset of data.md section 7 (300 days, 60/3 windows, 2+2 sources)."""
        base = dict(
            preset="small",
            n_days=300,
            daily_seq_len=60,
            monthly_seq_len=3,
            daily_sources=SMALL_DAILY_SOURCES,
            monthly_sources=SMALL_MONTHLY_SOURCES,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def losses(cls, losses_dir: str, monthly_csv_dir: Optional[str] = None, **overrides) -> "DataConfig":
        """Real loss data; the monthly layout is whatever the data provides."""
        base = dict(
            source="losses",
            losses_dir=losses_dir,
            monthly_csv_dir=monthly_csv_dir,
            monthly_sources=None,
        )
        base.update(overrides)
        return cls(**base)
