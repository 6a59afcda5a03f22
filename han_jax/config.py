"""Frozen configuration with the original's defaults in one place.

Every default below is the value ``train_multi_resolution.py main()`` uses at
ML-OSINT commit 75d6392 (``shared/spec/model.md`` section 1, ``data.md``
section 6), unless its comment says han-jax differs and why.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

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

# The small layout used by the test preset (data.md section 7: two daily and two
# monthly sources, 60-day and 3-month windows).
SMALL_DAILY_SOURCES: SourceLayout = (("personnel", 12), ("drones", 9))
SMALL_MONTHLY_SOURCES: SourceLayout = (("sentinel", 7), ("hdx_conflict", 5))

TASK_NAMES: Tuple[str, ...] = (
    "regime",
    "transition",
    "casualty",
    "anomaly",
    "forecast",
    "daily_forecast",
)

N_PHASES = 11
# 11 operational phases -> 4 coarse regime classes (data.md section 5).
PHASE_TO_COARSE: Tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of ``MultiResolutionHAN`` (the original's training defaults)."""

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
    daily_sources: SourceLayout = DAILY_SOURCES
    monthly_sources: SourceLayout = MONTHLY_SOURCES
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
    # independent stacks concurrently on its threads: the vmapped stack measured
    # 1.63 s against 1.56 s per default train step on 2 cores (it compiles in 64 s
    # instead of 72 s; benchmarks/README.md).
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

    task_names: Tuple[str, ...] = TASK_NAMES
    strategy: str = "kendall"  # "kendall" | "equal"
    log_var_clip: float = 2.0
    max_task_loss: float = 1e6
    log_var_reg: float = 0.01
    empty_reg: float = 1e-6


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup-cosine, clipping and accumulation (the original's values).

    ``log_var_lr_multiplier``: the original adds the log-variances as their own
    AdamW group at 10x the learning rate, but its ``WarmupCosineScheduler``
    returns one learning rate for every group, so in effect they trained at
    1x. han-jax applies the multiplier it meant (10); set 1.0 to reproduce
    what actually ran.
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 10
    num_epochs: int = 200
    min_lr: float = 1e-6
    warmup_start_factor: float = 0.01  # warmup starts at learning_rate * 0.01
    schedule_unit: str = "epoch"  # "epoch" (as the original) or "step"
    steps_per_epoch: int = 20  # optimiser updates per epoch; the trainer sets it from the data
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
