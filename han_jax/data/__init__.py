"""The numpy data pipeline: worlds (synthetic or real) -> aligned, normalised splits -> fixed-shape batches."""

from han_jax.config import MISSING_VALUE, DataConfig
from han_jax.data.batching import gather, iterate_batches, num_batches
from han_jax.data.layout import DataLayout, check_layout, layout_of
from han_jax.data.loss_records import IMPLAUSIBLE_VALUES, bundled_losses_dir, load_losses_world
from han_jax.data.normalisation import Normalisation
from han_jax.data.pipeline import (
    Calendar,
    Datasets,
    InferenceWindows,
    NormStats,
    SplitData,
    build_datasets,
    build_inference_windows,
    check_config,
    make_calendar,
)
from han_jax.data.synthetic import make_synthetic_world
from han_jax.data.transform import COUNT_TRANSFORMS
from han_jax.data.vintage import known_at
from han_jax.data.world import DataError, DayTargets, MissingFileError, MonthTargets, SourceTable, World, note

__all__ = [
    "COUNT_TRANSFORMS", "Calendar", "DataConfig", "DataError", "DataLayout", "Datasets", "DayTargets",
    "IMPLAUSIBLE_VALUES", "InferenceWindows", "MISSING_VALUE", "MissingFileError", "MonthTargets", "NormStats",
    "Normalisation", "SOURCES", "SourceTable", "SplitData", "World", "build_datasets", "build_inference_windows",
    "bundled_losses_dir", "check_config", "check_layout", "gather", "iterate_batches", "layout_of",
    "known_at", "load_losses_world", "make_calendar", "make_synthetic_world", "make_world", "num_batches",
]


# DataConfig.source's values: where a world comes from.
SOURCES = ("synthetic", "losses")


def make_world(config: DataConfig) -> World:
    """The world a ``DataConfig`` names (synthetic by seed/mode/preset, or the real loss data)."""
    check_config(config)  # a bad setting fails before the world is generated or loaded
    world = _whole_world(config)
    if config.known_at is not None:
        world = known_at(world, config.known_at, config.publication_lags)
    elif config.publication_lags:
        note(world.report, "data.publication_lags not applied: they count back from an origin (data.known_at, set "
                           "at each origin of a backtest); this run reads all the data")
    return world


def _whole_world(config: DataConfig) -> World:
    if config.source == "synthetic":
        def names(spec):
            return None if spec is None else [e if isinstance(e, str) else e[0] for e in spec]

        return make_synthetic_world(
            config.seed, mode=config.mode, preset=config.preset, n_days=config.n_days,
            daily_sources=names(config.daily_sources), monthly_sources=names(config.monthly_sources),
        )
    if config.source == "losses":
        # No folder: the snapshot bundled with the package.
        return load_losses_world(config.losses_dir or bundled_losses_dir(), config.monthly_csv_dir,
                                 implausible_values=config.implausible_values)
    raise DataError(f"DataConfig.source={config.source!r}; expected one of {', '.join(map(repr, SOURCES))}")
