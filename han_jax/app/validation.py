"""``validate_config``: every check of a :class:`~han_jax.config.Config` that needs no data, run first.

A bad value would otherwise surface late and far from its cause (``--batch-size 0`` as a
division by zero, ``--devices 3`` with batch 8 after a minute of compiling).
:func:`validate_config` runs before any data is built or anything is compiled, and fails
with one :class:`~han_jax.config.ConfigError` whose message is one line: the field, its
value and what was expected (``train.batch_size=0: expected an integer >= 1``), so the
command line can print it without a traceback.

Each rule is written once, by its owner, and called or imported from here: the data
section's checks (``han_jax.data.check_config``, the synthetic world's ``resolve_spec``),
the allowed values of the aggregate, the schedule, the device layouts and the random
number generator, the batch's divisibility among the devices, the registered tasks.
Checks that need the data itself (a window longer than the data, a split with no
anchor) stay in ``build_datasets``: they raise a one-line ``DataError``, still
before anything is compiled.
"""

from __future__ import annotations

import datetime
import math
import numbers
from typing import Any, Iterable, NoReturn, Optional

from han_jax import tasks
from han_jax.config import (
    N_PHASES,
    AggregateConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RegularizationConfig,
    TrainConfig,
)
from han_jax.core.aggregate import STRATEGIES
from han_jax.core.precision import Policy
from han_jax.data import SOURCES, DataError, check_config
from han_jax.data.synthetic import resolve_spec
from han_jax.model.daily_temporal import MULTI_SCALE_GROUPS
from han_jax.model.heads import CONTEXT_HEADS
from han_jax.training.devices import PARALLEL_KINDS, check_batch
from han_jax.training.schedule import SCHEDULE_UNITS
from han_jax.training.steps import RNG_IMPLS


def _fail(field: str, value: Any, expected: str) -> NoReturn:
    raise ConfigError(f"{field}={value!r}: expected {expected}")


def check_int(field: str, value: Any, minimum: int = 1) -> None:
    """``value`` is an int (not a bool: ``True`` would pass as 1) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(field, value, f"an integer >= {minimum}")


def check_number(field: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number in the interval given (``low_open``: ``value > low``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            expected = f"a number in {interval}"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            expected = "a finite number"
        _fail(field, value, expected)


def _check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "true or false")


def _check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(field, value, f"one of {', '.join(repr(c) for c in choices)}")


def _check_layout(field: str, layout: Any, *, allow_counts: bool, allow_none: bool) -> None:
    """A source layout: a non-empty tuple of names or (name, n_features >= 1) pairs; model layouts need pairs."""
    if layout is None and allow_none:
        return
    expected = "a non-empty list of (name, n_features) pairs" if not allow_counts else (
        "a non-empty list of source names or (name, n_features) pairs" + (", or none for every source of the data"
                                                                          if allow_none else ""))
    if not isinstance(layout, tuple) or not layout:
        _fail(field, layout, expected)
    names = []
    for entry in layout:
        if isinstance(entry, str) and allow_counts:
            names.append(entry)
            continue
        if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
                or isinstance(entry[1], bool) or not isinstance(entry[1], numbers.Integral) or entry[1] < 1):
            _fail(field, layout, f"{expected}; entry {entry!r} is not")
        names.append(entry[0])
    if len(set(names)) != len(names):
        _fail(field, layout, "each source named once")


def _check_date(field: str, value: Any) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except (TypeError, ValueError):
        _fail(field, value, "a date YYYY-MM-DD")


def _check_model(m: ModelConfig) -> None:
    for name in ("d_model", "nhead", "num_daily_layers", "num_monthly_layers", "num_fusion_layers",
                 "num_temporal_layers", "n_regime_classes", "daily_forecast_horizon", "local_window", "max_daily_len",
                 "max_months", "monthly_dim_feedforward"):
        check_int(f"model.{name}", getattr(m, name))
    if m.d_model % m.nhead:
        _fail("model.d_model", m.d_model, f"a multiple of model.nhead={m.nhead} (each head takes d_model / nhead)")
    if (m.d_model // 4) % MULTI_SCALE_GROUPS:
        _fail("model.d_model", m.d_model, f"d_model // 4 a multiple of {MULTI_SCALE_GROUPS} (the daily temporal "
              f"encoder's multi-scale convolutions have d_model // 4 channels in {MULTI_SCALE_GROUPS} groups)")
    if not m.use_latent_forecast and m.d_model % CONTEXT_HEADS:
        _fail("model.d_model", m.d_model, f"a multiple of {CONTEXT_HEADS} (the daily forecasting head of "
              f"model.use_latent_forecast=false has {CONTEXT_HEADS} heads)")
    check_number("model.dropout", m.dropout, low=0.0, high=1.0, high_open=True)
    check_int("model.attention_block", m.attention_block, minimum=0)
    for name in ("causal", "use_latent_forecast", "forecast_residual", "regime_daily_state", "remat",
                 "return_attention"):
        _check_bool(f"model.{name}", getattr(m, name))
    if m.vmap_sources is not None:
        _check_bool("model.vmap_sources", m.vmap_sources)
    # None: the model takes the data's layout (Resolved); a layout given must be the data's.
    _check_layout("model.daily_sources", m.daily_sources, allow_counts=False, allow_none=True)
    _check_layout("model.monthly_sources", m.monthly_sources, allow_counts=False, allow_none=True)


def _check_data(d: DataConfig, model: ModelConfig) -> None:
    # The data section's own checks first (count transform, val/test stride), where the data code keeps them.
    try:
        check_config(d)
    except DataError as e:
        raise ConfigError(str(e)) from e
    _check_choice("data.source", d.source, SOURCES)
    start = _check_date("data.start_date", d.start_date)
    if d.source == "synthetic":
        if d.n_days is not None:
            check_int("data.n_days", d.n_days)
        try:  # mode, preset and length, checked by the synthetic world itself (nothing is generated)
            resolve_spec(d.seed, mode=d.mode, preset=d.preset, n_days=d.n_days, start=d.start_date,
                         daily_sources=None, monthly_sources=None)
        except DataError as e:
            raise ConfigError(f"data: {e}") from e
    elif d.losses_dir is not None and not (isinstance(d.losses_dir, str) and d.losses_dir):
        _fail("data.losses_dir", d.losses_dir, "the directory of the loss records, or none for the bundled snapshot")
    if d.end_date is not None and _check_date("data.end_date", d.end_date) < start:
        _fail("data.end_date", d.end_date, f"a date after data.start_date={d.start_date!r}")
    _check_layout("data.daily_sources", d.daily_sources, allow_counts=True, allow_none=True)
    _check_layout("data.monthly_sources", d.monthly_sources, allow_counts=True, allow_none=True)
    for name in ("daily_seq_len", "monthly_seq_len", "prediction_horizon", "daily_forecast_horizon"):
        check_int(f"data.{name}", getattr(d, name))
    # The model's positional tables bound the windows; past them the model fails only when first traced.
    if d.daily_seq_len > model.max_daily_len:
        _fail("data.daily_seq_len", d.daily_seq_len, f"at most model.max_daily_len={model.max_daily_len}")
    if d.monthly_seq_len > model.max_months:
        _fail("data.monthly_seq_len", d.monthly_seq_len, f"at most model.max_months={model.max_months}")
    check_number("data.val_ratio", d.val_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    check_number("data.test_ratio", d.test_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    if d.val_ratio + d.test_ratio >= 1.0:
        _fail("data.test_ratio", d.test_ratio, f"data.val_ratio + data.test_ratio < 1 (val_ratio={d.val_ratio}: "
                                               "no train days would remain)")
    check_int("data.embargo_days", d.embargo_days, minimum=0)
    check_number("data.std_floor", d.std_floor, low=0.0, low_open=True)
    check_number("data.missing_value", d.missing_value)
    check_int("data.seed", d.seed, minimum=0)
    for name in ("norm_whole_train_months", "daily_forecast_targets"):
        _check_bool(f"data.{name}", getattr(d, name))
    if d.daily_forecast_targets and d.daily_forecast_horizon != model.daily_forecast_horizon:
        _fail("data.daily_forecast_horizon", d.daily_forecast_horizon,
              f"model.daily_forecast_horizon={model.daily_forecast_horizon} with data.daily_forecast_targets on "
              "(the head predicts that many days)")


def _check_loss(loss: LossConfig, model: ModelConfig) -> None:
    check_number("step.loss.label_smoothing", loss.label_smoothing, low=0.0, high=1.0, high_open=True)
    check_number("step.loss.regime_logit_clamp", loss.regime_logit_clamp, low=0.0, low_open=True)
    for name in ("regime_loss_floor", "regime_entropy_weight", "regime_diversity_weight", "focal_gamma"):
        check_number(f"step.loss.{name}", getattr(loss, name), low=0.0)
    check_number("step.loss.focal_alpha", loss.focal_alpha, low=0.0, high=1.0)
    check_number("step.loss.casualty_target_scale", loss.casualty_target_scale, low=0.0, low_open=True)
    for name in ("transition_focal", "daily_forecast_latent"):
        _check_bool(f"step.loss.{name}", getattr(loss, name))
    p2c, k = loss.phase_to_coarse, model.n_regime_classes
    valid = (isinstance(p2c, tuple) and len(p2c) == N_PHASES
             and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c < k for c in p2c))
    if not valid:
        _fail("step.loss.phase_to_coarse", p2c, f"{N_PHASES} class indices (one per phase), each in "
                                                f"0..{k - 1} for model.n_regime_classes={k}")


def _check_aggregate(agg: AggregateConfig) -> None:
    names, known = agg.task_names, tasks.names()
    if names is not None and (not isinstance(names, tuple) or not names or len(set(names)) != len(names)
                              or any(n not in known for n in names)):
        _fail("step.aggregate.task_names", names, f"none (every task), or a non-empty list of distinct tasks among "
                                                  f"{', '.join(known)}")
    _check_choice("step.aggregate.strategy", agg.strategy, STRATEGIES)
    check_number("step.aggregate.log_var_clip", agg.log_var_clip, low=0.0, low_open=True)
    check_number("step.aggregate.max_task_loss", agg.max_task_loss, low=0.0, low_open=True)
    check_number("step.aggregate.log_var_reg", agg.log_var_reg, low=0.0)
    check_number("step.aggregate.empty_reg", agg.empty_reg, low=0.0)


def _check_optim(o: OptimConfig) -> None:
    p = "step.optim"
    check_number(f"{p}.learning_rate", o.learning_rate, low=0.0, low_open=True)
    check_number(f"{p}.min_lr", o.min_lr, low=0.0)
    if o.min_lr > o.learning_rate:
        _fail(f"{p}.min_lr", o.min_lr, f"at most {p}.learning_rate={o.learning_rate:g} (the cosine decays to it)")
    check_number(f"{p}.weight_decay", o.weight_decay, low=0.0)
    # Any warmup length runs: the schedule shortens a warmup that leaves no epoch to decay over
    # (han_jax.training.schedule.Schedule.of).
    check_int(f"{p}.warmup_epochs", o.warmup_epochs, minimum=0)
    check_number(f"{p}.warmup_start_factor", o.warmup_start_factor, low=0.0, high=1.0)
    _check_choice(f"{p}.schedule_unit", o.schedule_unit, SCHEDULE_UNITS)
    check_number(f"{p}.max_grad_norm", o.max_grad_norm, low=0.0, low_open=True)
    check_int(f"{p}.accumulation_steps", o.accumulation_steps)
    check_number(f"{p}.log_var_lr_multiplier", o.log_var_lr_multiplier, low=0.0)
    check_number(f"{p}.loss_guard_threshold", o.loss_guard_threshold, low=0.0, low_open=True)
    check_number(f"{p}.loss_guard_target", o.loss_guard_target, low=0.0, low_open=True)


def _check_regularization(r: RegularizationConfig) -> None:
    p = "step.regularization"
    for name in ("temporal_reg", "source_dropout"):
        _check_bool(f"{p}.{name}", getattr(r, name))
    check_number(f"{p}.temporal_corr_weight", r.temporal_corr_weight, low=0.0)
    check_number(f"{p}.temporal_smooth_weight", r.temporal_smooth_weight, low=0.0)
    check_number(f"{p}.source_dropout_prob", r.source_dropout_prob, low=0.0, high=1.0)
    if not isinstance(r.source_dropout_sources, tuple) or not all(isinstance(s, str) for s in r.source_dropout_sources):
        _fail(f"{p}.source_dropout_sources", r.source_dropout_sources, "a list of source names")


def _check_train(t: TrainConfig) -> None:
    check_int("train.epochs", t.epochs)
    check_int("train.patience", t.patience)
    check_int("train.seed", t.seed, minimum=0)
    check_int("train.batch_size", t.batch_size)
    check_int("train.num_devices", t.num_devices)
    check_batch(t.batch_size, t.num_devices)
    _check_choice("train.parallel", t.parallel, PARALLEL_KINDS)
    for name in ("score_test_each_epoch", "tensorboard"):
        _check_bool(f"train.{name}", getattr(t, name))


def validate_config(config: Config) -> None:
    """Raises :class:`ConfigError` (one line: field, value, what was expected) for the first value that cannot run.

    Needs no data and does no JAX work, so commands call it before either.
    """
    if not isinstance(config, Config):
        raise ConfigError(f"config={type(config).__name__}: expected a han_jax.config.Config")
    _check_model(config.model)
    _check_data(config.data, config.model)
    step = config.step
    if not isinstance(step.policy, Policy):
        _fail("step.policy", step.policy, "a precision policy: f32, bf16, f16 or params=..,compute=..,output=..")
    _check_loss(step.loss, config.model)
    _check_aggregate(step.aggregate)
    _check_optim(step.optim)
    _check_regularization(step.regularization)
    if step.log_var_priors is not None:
        check_number("step.log_var_priors", step.log_var_priors)
    _check_choice("step.rng_impl", step.rng_impl, RNG_IMPLS)
    _check_train(config.train)
