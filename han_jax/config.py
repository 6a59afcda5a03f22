"""The one configuration root: what the user asks for, in frozen sections with the original's defaults.

A run is described by one :class:`Config` tree (``model``, ``data``, ``step``,
``train``), the way Flax examples describe theirs in ``configs/default.py``:
presets are functions that build on each other (:func:`default` ->
:func:`small` -> :func:`tiny`), and :func:`config_to_dict` /
:func:`config_from_dict` round-trip a config through ``config.json`` exactly.

A :class:`Config` holds only what the user wrote. What a run derives from its data
(the model's source layout, the optimiser updates per epoch) is a :class:`Resolved`
beside it, saved as ``resolved.json``; the compiled steps see neither whole, only the
part that changes their program (``han_jax.training.spec.StepSpec``).

Every default below is the value the original trainer's ``main()`` uses at
ML-OSINT commit 75d6392 (``docs/model.md`` section 1, ``docs/data.md``
section 6), unless its comment says han-jax differs and why.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Dict, Optional, Tuple, Union

from han_jax.core.precision import Policy


class ConfigError(ValueError):
    """A configuration value that cannot run. The message is one line naming the field, the value and what
    was expected, so a command can print it as it is."""


SourceLayout = Tuple[Tuple[str, int], ...]

DAILY_SOURCES: SourceLayout = (
    ("personnel", 12),
    ("drones", 9),
    ("armor", 9),
    ("artillery", 15),
)
MONTHLY_SOURCES: SourceLayout = (
    ("sentinel", 7),
    ("hdx_conflict", 5),
    ("hdx_food", 10),
    ("hdx_rainfall", 6),
    ("iom", 7),
)

# The small layout used by the test preset (docs/data.md section 7.1: two daily and two
# monthly sources, 60-day and 3-month windows).
SMALL_DAILY_SOURCES: SourceLayout = (("personnel", 12), ("drones", 9))
SMALL_MONTHLY_SOURCES: SourceLayout = (("sentinel", 7), ("hdx_conflict", 5))

N_PHASES = 11
# 11 operational phases -> 4 coarse regime classes (docs/data.md section 5.1).
PHASE_TO_COARSE: Tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of ``MultiResolutionHAN`` (the original's training defaults).

    ``daily_sources`` / ``monthly_sources`` are the ``(name, n_features)`` blocks the model
    reads. In a run's :class:`Config` they are None: the layout is the data's
    (:class:`Resolved`); a layout given there must equal the data's.
    """

    d_model: int = 128
    nhead: int = 8
    num_daily_layers: int = 3
    num_monthly_layers: int = 2
    num_fusion_layers: int = 2
    num_temporal_layers: int = 2
    dropout: float = 0.1
    causal: bool = True
    n_regime_classes: int = 4
    use_latent_forecast: bool = True
    daily_forecast_horizon: int = 7
    # han-jax option (off = the original): the monthly forecast head starts from the
    # window's current month, ``forecast_pred = head(z) + gain * x_month`` (masked inputs
    # count as 0; ``gain`` one learnt number per monthly feature, initialised to 1). The
    # original's head must rebuild the current value through the whole stack; on smooth
    # monthly series "next month = this month" then beats it (README main job: iom val
    # MSE 0.92 vs persistence 0.06). Adds ``n_monthly_features`` parameters.
    forecast_residual: bool = False
    # han-jax option (off = the original): the regime head reads, beside each month's
    # temporal output, the daily temporal encoder's state on that month's last day. The
    # label is the regime of the anchor day; through the monthly tokens alone the head
    # saw 90 days and every monthly source, which let it memorise the training split's
    # 21 regime segments (probe on the learnable world: the last week's daily means give
    # val/test balanced accuracy 0.89/0.85, 12 weeks plus the monthly sources 0.49/0.48).
    regime_daily_state: bool = False
    # han-jax option (off = the original): the transition logit comes from a head of its own
    # (``transition_logit``, an MLP like the anomaly head's on the regime head's input) instead of
    # the anomaly head's last-month score, which the original regresses to the VIIRS anomaly and
    # classifies as a transition at once (README main job: transition log score 0.58 against the
    # training base rate's 0.11). Adds one head's parameters.
    transition_head: bool = False
    daily_sources: Optional[SourceLayout] = DAILY_SOURCES
    monthly_sources: Optional[SourceLayout] = MONTHLY_SOURCES
    # Hard-coded internals of the original, kept configurable.
    local_window: int = 31  # DailyTemporalEncoder causal window (days, the query included)
    max_daily_len: int = 1500  # sinusoidal / positional tables of the daily modules
    max_months: int = 60  # month query and monthly tables
    monthly_dim_feedforward: int = 256  # MultiSourceMonthlyEncoder ff width (fixed in the original)
    # Implementation switches (no effect on the maths).
    remat: bool = False  # nn.remat on the daily transformer layers
    # Query block of the causal daily attention and the local window attention:
    # only the keys the mask can allow are computed (0: dense [T, T] attention).
    attention_block: int = 64
    # Run the same-shaped per-source stacks (the daily transformer layers) as one
    # jax.vmap over stacked parameters instead of one stack per source. None: vmap
    # on GPU/TPU (fewer, larger kernels), per source on CPU, where XLA runs the four
    # independent stacks concurrently on its threads and the vmapped stack measured
    # slower (benchmarks/README.md).
    vmap_sources: Optional[bool] = None
    return_attention: bool = False  # add attention maps to the outputs

    @property
    def daily_source_names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.daily_sources)

    @property
    def monthly_source_names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.monthly_sources)

    @property
    def n_monthly_features(self) -> int:
        return sum(f for _, f in self.monthly_sources)

    @property
    def n_daily_features(self) -> int:
        return sum(f for _, f in self.daily_sources)

    @classmethod
    def small(cls, **overrides) -> "ModelConfig":
        """A fast configuration for tests and the CI-sized main job."""
        base = dict(
            d_model=32,
            nhead=4,
            num_daily_layers=1,
            num_monthly_layers=1,
            num_fusion_layers=1,
            num_temporal_layers=1,
            daily_sources=SMALL_DAILY_SOURCES,
            monthly_sources=SMALL_MONTHLY_SOURCES,
        )
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Options of ``compute_losses`` (the original's values)."""

    label_smoothing: float = 0.1
    regime_logit_clamp: float = 50.0
    regime_loss_floor: float = 0.05
    regime_entropy_weight: float = 0.3
    regime_diversity_weight: float = 0.3
    transition_focal: bool = False  # focal loss for transitions; off at 75d6392
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    casualty_target_scale: float = 1000.0
    daily_forecast_latent: bool = True
    phase_to_coarse: Tuple[int, ...] = PHASE_TO_COARSE


@dataclasses.dataclass(frozen=True)
class AggregateConfig:
    """Options of ``aggregate`` (Kendall et al. 2018 uncertainty weighting)."""

    # The tasks the total weighs (each gets a log-variance); None: every task of the registry (han_jax.tasks).
    task_names: Optional[Tuple[str, ...]] = None
    strategy: str = "kendall"  # "kendall" | "equal"
    log_var_clip: float = 2.0
    max_task_loss: float = 1e6
    log_var_reg: float = 0.01
    empty_reg: float = 1e-6


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup-cosine, clipping and accumulation (the original's values).

    The learning-rate curve (``learning_rate``, ``warmup_epochs``, ``min_lr``,
    ``warmup_start_factor``, and ``TrainConfig.epochs`` as its length) is a run-time value
    of the compiled steps (``han_jax.training.schedule.Schedule``): changing it recompiles
    nothing. The other fields shape the update itself.

    ``log_var_lr_multiplier``: the original adds the log-variances as their own
    AdamW group at 10x the learning rate, but its ``WarmupCosineScheduler``
    returns one learning rate for every group, so in effect they trained at
    1x. han-jax applies the multiplier it meant (10); set 1.0 to reproduce
    what actually ran.
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 10  # the schedule's length is TrainConfig.epochs
    min_lr: float = 1e-6
    warmup_start_factor: float = 0.01  # warmup starts at learning_rate * 0.01
    schedule_unit: str = "epoch"  # "epoch" (as the original) or "step" (optimiser updates, Resolved.steps_per_epoch)
    max_grad_norm: float = 1.0  # on model parameters only, as clip_grad_norm_(model.parameters())
    accumulation_steps: int = 4
    log_var_lr_multiplier: float = 10.0
    loss_guard_threshold: float = 1e6  # an objective above this is rescaled ...
    loss_guard_target: float = 1000.0  # ... to this value, keeping its gradient direction


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """Train-only extras, both off by default as at 75d6392."""

    temporal_reg: bool = False
    temporal_corr_weight: float = 0.01
    temporal_smooth_weight: float = 0.001
    source_dropout: bool = False
    source_dropout_prob: float = 0.4
    source_dropout_sources: Tuple[str, ...] = ("hdx_rainfall",)


MISSING_VALUE = -999.0

# A source selection entry is a name, or a (name, n_features) pair whose count is
# checked against the data.
SourceSpec = Union[str, Tuple[str, int]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how to cut it into samples (``docs/data.md`` sections 2, 4 and 6).

    ``daily_sources`` / ``monthly_sources`` select and order the world's sources;
    ``None`` takes every source of the world in its own order. Entries may be names
    or ``(name, n_features)`` pairs; a pair whose count differs from the data is an
    error (the layout the model was built for would not match).

    han-jax additions (off / neutral by default, so the defaults reproduce the
    original's samples): ``embargo_days`` (a gap of anchor days dropped at the start
    of val and of test), ``daily_forecast_targets`` (keep the 7-day targets the
    original's collate drops), ``norm_whole_train_months=False`` (fit daily
    statistics on train days only instead of every day of every month touched by
    train), ``count_transform`` ("none"; ``"log1p"`` compresses the daily counts
    before the fit, the default of :meth:`losses`).

    One deliberate difference in the defaults: ``val_sample_stride=1`` scores val
    and test on every valid anchor day (215 each on the default world) instead of
    the original's automatic stride (10 each), which cannot measure skill;
    ``val_sample_stride=None`` selects the original's stride.
    """

    # Where the world comes from (used by ``han_jax.data.make_world``).
    source: str = "synthetic"  # "synthetic" | "losses"
    mode: str = "learnable"  # synthetic: "learnable" | "realistic"
    preset: str = "default"  # synthetic: "default" | "small"
    losses_dir: Optional[str] = None  # real data: None reads the snapshot bundled with han-jax
    monthly_csv_dir: Optional[str] = None
    # Real data: what to do with a loss-record value that is not finite, negative or above the
    # plausibility ceiling (han_jax/data/loss_records.py): "error" (stop, naming file, field, date
    # and value), "clip" (into [0, ceiling]; NaN is dropped) or "drop" (treat it as missing).
    # Every clipped or dropped value is one line of the data report.
    implausible_values: str = "error"
    n_days: Optional[int] = None  # synthetic length; None = the preset's

    daily_sources: Optional[Tuple[SourceSpec, ...]] = DAILY_SOURCES
    monthly_sources: Optional[Tuple[SourceSpec, ...]] = MONTHLY_SOURCES

    start_date: str = "2022-02-24"
    end_date: Optional[str] = None
    # The data as it was known on this day (han_jax/data/vintage.py): every record dated on or after it
    # is removed before anything else reads the data. A backtest sets it at each origin; None: all of it.
    known_at: Optional[str] = None
    # [(monthly source, months)]: how many months after it ends a monthly source is published, counted
    # back from known_at (sources not named: 0). Recorded with every backtest origin's run.
    publication_lags: Tuple[Tuple[str, int], ...] = ()
    daily_seq_len: int = 365
    monthly_seq_len: int = 12
    prediction_horizon: int = 1
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    # Val/test anchor stride. 1 (han-jax's default, deliberately not the original's): every
    # valid day, >= 100 anchors per split on the embedded world. None: the original's
    # automatic stride (the largest <= daily_seq_len // 2 that keeps 10 anchors).
    val_sample_stride: Optional[int] = 1
    embargo_days: int = 0
    std_floor: float = 0.1
    # Transform of the daily source features before the train-only z-score fit
    # (han_jax/data/transform.py): "none" (the original) or "log1p" (sign(x) * log1p(|x|)
    # on the count-like daily features, all but the two personnel ratios). "log1p" is
    # the default of DataConfig.losses: the real counts are far from stationary.
    count_transform: str = "none"
    missing_value: float = MISSING_VALUE
    norm_whole_train_months: bool = True
    daily_forecast_targets: bool = False
    daily_forecast_horizon: int = 7
    seed: int = 42

    @classmethod
    def small(cls, **overrides) -> "DataConfig":
        """The fast test preset of ``docs/data.md`` section 7 (300 days, 60/3 windows, 2+2 sources)."""
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
    def losses(cls, losses_dir: Optional[str] = None, monthly_csv_dir: Optional[str] = None,
               **overrides) -> "DataConfig":
        """Real loss data; the monthly layout is whatever the data provides; daily counts log1p-transformed.

        ``losses_dir`` None: the snapshot bundled with the package (``han_jax.data.make_world`` finds it),
        so this works from any directory and a ``config.json`` that says None works on any machine.
        """
        base = dict(
            source="losses",
            losses_dir=losses_dir,
            monthly_csv_dir=monthly_csv_dir,
            monthly_sources=None,
            count_transform="log1p",
        )
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How every step computes: precision, losses, aggregation, optimiser, train-only extras.

    ``policy`` is the one precision policy of every phase (``docs/audit.md``
    section 2: the original ran its test phase at another precision).
    """

    policy: Policy = Policy()
    loss: LossConfig = LossConfig()
    aggregate: AggregateConfig = AggregateConfig()
    optim: OptimConfig = OptimConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    log_var_priors: Optional[float] = None  # None: the original's per-task priors
    # PRNG behind parameter init and dropout. threefry, JAX's default, inlines a
    # large graph per draw, which made init and the dropout train step several times
    # slower to compile on CPU; "unsafe_rbg" lowers to one RngBitGenerator op. Its
    # streams are fixed for a JAX version; use "threefry2x32" for streams that are
    # stable across JAX versions.
    rng_impl: str = "unsafe_rbg"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings (the original's CLI defaults)."""

    epochs: int = 200  # also the length of the learning-rate schedule
    batch_size: int = 8
    patience: int = 30
    seed: int = 42
    # Devices that share each step (a multi-process run: every device of every process); see han_jax.training.devices.
    num_devices: int = 1
    # How num_devices > 1 share a step: "sharded" (jit over a Mesh, NamedSharding; the default) or "pmap".
    parallel: str = "sharded"
    score_test_each_epoch: bool = True  # for the comparability plot; never used for selection
    # TensorBoard event files (run_dir/tensorboard) with metrics.jsonl's scalars, when the
    # optional tensorboardX is installed (pip install "han-jax[tensorboard]").
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run as the user asked for it: one frozen, hashable tree.

    Printed at the start of a run and saved as its ``config.json``. The compiled steps
    are keyed by the part of it that changes their program
    (``han_jax.training.spec.StepSpec``), not by the whole tree.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    step: StepConfig = StepConfig()
    train: TrainConfig = TrainConfig()

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a run derived from its data: saved beside ``config.json`` as ``resolved.json``.

    Attributes:
      daily_sources, monthly_sources: the ``(name, n_features)`` blocks of the data, in the
        order the model reads them (the model's source layout).
      steps_per_epoch: optimiser updates per epoch (train batches // accumulation steps, at
        least 1): the unit of a ``"step"`` learning-rate schedule.
      tasks: the names of the tasks the run trains, in order (the registry's when the run
        was prepared); None where a run folder did not record them.
    """

    daily_sources: SourceLayout
    monthly_sources: SourceLayout
    steps_per_epoch: int = 1
    tasks: Optional[Tuple[str, ...]] = None

    def model(self, model: ModelConfig) -> ModelConfig:
        """``model`` with this data's source layout: the architecture the steps build.

        Raises:
          ConfigError: ``model`` names a layout of its own that is not the data's.
        """
        for name in ("daily_sources", "monthly_sources"):
            given, data = getattr(model, name), getattr(self, name)
            if given is not None and tuple(given) != tuple(data):
                raise ConfigError(f"model.{name}={_json_text(given)}: expected the data's layout {_json_text(data)} "
                                  "(or none: the model takes the data's)")
        return dataclasses.replace(model, daily_sources=tuple(self.daily_sources),
                                   monthly_sources=tuple(self.monthly_sources))


# ---------------------------------------------------------------------------
# Presets: each builds on the one before.
# ---------------------------------------------------------------------------


def default() -> Config:
    """The original's full-size model (8,192,006 parameters) and data (365-day / 12-month windows)."""
    # The model's source layout comes from the data (Resolved).
    return Config(model=ModelConfig(daily_sources=None, monthly_sources=None))


def small() -> Config:
    """The README's main job: the embedded synthetic world, a small model, minutes on 2 CPU cores."""
    base = default()
    return base.replace(
        # The source layout is taken from the data. The residual forecast is han-jax's
        # option (ModelConfig.forecast_residual); the default preset keeps the original.
        model=ModelConfig.small(forecast_residual=True, regime_daily_state=True, daily_sources=None,
                                monthly_sources=None),
        data=dataclasses.replace(base.data, daily_seq_len=90, monthly_seq_len=4),
        step=dataclasses.replace(
            base.step,
            optim=dataclasses.replace(base.step.optim, learning_rate=1e-3, warmup_epochs=1, accumulation_steps=1),
        ),
        train=dataclasses.replace(base.train, epochs=6, batch_size=16),
    )


def tiny() -> Config:
    """Tests: the small data preset and the smallest model."""
    base = small()
    return base.replace(
        model=dataclasses.replace(base.model, d_model=16, nhead=2),
        data=DataConfig.small(),
        train=dataclasses.replace(base.train, epochs=2, batch_size=8),
    )


PRESETS: Dict[str, Callable[[], Config]] = {"default": default, "small": small, "tiny": tiny}


def get_config(preset: str) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[preset]()


# ---------------------------------------------------------------------------
# JSON: config.json round-trips exactly.
# ---------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, Policy):
        return value.name
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _json_text(value) -> str:
    return json.dumps(_to_json(value))


def config_to_dict(config) -> dict:
    """A config section (or the whole :class:`Config`) as plain JSON data; the policy as its name."""
    return _to_json(config)


def _tuples(value: Any) -> Any:
    # Every sequence field of a config is a (possibly nested) tuple: JSON gives lists.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_dict(data: dict, cls: type = Config, *, where: str = "config") -> Any:
    """Rebuilds a config section from :func:`config_to_dict`'s output.

    A missing field takes its default; an unknown one is an error that names it
    (a config written by another version must not load as something else).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if kind is Policy:
            kwargs[name] = Policy.from_string(value)
        elif dataclasses.is_dataclass(kind):
            kwargs[name] = config_from_dict(value, kind, where=f"{where}.{name}")
        else:
            kwargs[name] = _tuples(value)
    return cls(**kwargs)
