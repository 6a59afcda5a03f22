"""Jitted train, eval and test steps on one shared loss path.

The audit (``shared/spec/loss-audit.md``) found that the original's
``train_epoch``, ``validate`` and ``evaluate`` each built their totals
differently. Here :func:`_shared_forward` (model -> ``compute_losses`` ->
``aggregate`` -> metrics, under the configured precision policy) is the only
place a total is formed, and :func:`train_step`, :func:`eval_step` and
:func:`test_step` all call it. They return the same metric keys; train adds
what only training has (objective, temporal regulariser, learning rate,
skipped-step flag), test adds per-row predictions.

Every function takes ``axis_name``: inside ``pmap`` the batch statistics of
the losses and the metrics are taken across devices and gradients are
``pmean``-ed, so N devices holding B/N rows give the metrics and updated
parameters of one device holding all B rows.

Deliberate differences from the original trainer:
  * A step whose gradients are not finite changes neither parameters nor
    optimiser state, and is counted (the original relied on GradScaler,
    which it only had for float16).
  * Gradient accumulation uses ``optax.MultiSteps``; the trainer resets a
    partial accumulation at each epoch start, as the original's
    ``grad_accumulator.zero_grad()`` did.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from han_jax.aggregate import AggregateInfo, aggregate, init_log_vars
from han_jax.batch import Inputs, Targets
from han_jax.config import (
    AggregateConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RegularizationConfig,
)
from han_jax.losses import (
    compute_losses_with_diagnostics,
    masked_mean,
    masked_sum,
    regime_labels,
    temporal_regularization,
    zinb_parameters,
)
from han_jax.model import MultiResolutionHAN
from han_jax.precision import Policy, all_finite, make_loss_scale

Array = jax.Array

HIGH_OBS_RATE = 0.8  # validate()'s stratification thresholds on the monthly obs rate
LOW_OBS_RATE = 0.5


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything a step is traced with. Hashable: it is a static argument."""

    model: ModelConfig = ModelConfig()
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


@flax.struct.dataclass
class TrainState:
    """All that changes during training; a pytree, checkpointed whole.

    Attributes:
      step: micro-batches seen (train_step calls).
      epoch: the epoch the schedule reads in per-epoch mode (set by the trainer).
      params: model parameters.
      log_vars: ``{task: scalar}`` Kendall log-variances.
      opt_state: ``optax.MultiSteps`` state over ``{"model", "log_vars"}``.
      loss_scale: :class:`~han_jax.precision.NoOpLossScale` or dynamic (f16).
      rng: key for dropout and source dropout.
    """

    step: Array
    epoch: Array
    params: Any
    log_vars: dict
    opt_state: Any
    loss_scale: Any
    rng: Array


def typed_key(raw_key: Array, impl: str) -> Array:
    """A key of ``impl`` seeded by one draw from the state's (threefry) key."""
    return jax.random.key(jax.random.bits(raw_key, (), jnp.uint32), impl=impl)


def make_model(config: StepConfig) -> MultiResolutionHAN:
    return MultiResolutionHAN(config=config.model, policy=config.policy)


def learning_rate_schedule(optim: OptimConfig) -> optax.Schedule:
    """The original's ``WarmupCosineScheduler``, built from optax's.

    Linear warmup from ``learning_rate * 0.01`` over ``min(warmup_epochs,
    max(1, num_epochs - 1))`` epochs (the trainer's effective warmup), then
    cosine decay to ``min_lr`` at ``num_epochs``. In ``"step"`` mode the same
    curve is stretched over optimiser updates.
    """
    warmup = min(optim.warmup_epochs, max(1, optim.num_epochs - 1))
    total = optim.num_epochs
    if optim.schedule_unit == "step":
        warmup, total = warmup * optim.steps_per_epoch, total * optim.steps_per_epoch
    elif optim.schedule_unit != "epoch":
        raise ValueError(f"OptimConfig.schedule_unit is {optim.schedule_unit!r}; expected 'epoch' or 'step'")
    return optax.warmup_cosine_decay_schedule(
        init_value=optim.learning_rate * optim.warmup_start_factor,
        peak_value=optim.learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=optim.min_lr,
    )


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """AdamW directions at unit learning rate; the step scales them by the schedule.

    The learning rate is applied in :func:`train_step` (``updates * lr``)
    rather than inside optax so that the per-epoch schedule can read the
    epoch from the state, as the original's ``scheduler.step()`` per epoch
    did. ``p - lr * (adam + wd * p)`` is exactly AdamW either way.
    """
    # optax.flatten runs each group on one concatenated vector: the same maths (the
    # global norm and AdamW are elementwise or whole-vector), but a handful of ops
    # instead of a few per parameter leaf, which cut the step's compile time by a third.
    model_tx = optax.flatten(optax.chain(
        optax.clip_by_global_norm(optim.max_grad_norm),
        optax.adamw(learning_rate=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=optim.weight_decay),
    ))
    log_var_tx = optax.flatten(
        optax.adamw(learning_rate=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=optim.weight_decay))
    tx = optax.multi_transform(
        {"model": model_tx, "log_vars": log_var_tx}, {"model": "model", "log_vars": "log_vars"}
    )
    return optax.MultiSteps(tx, every_k_schedule=optim.accumulation_steps)


@functools.lru_cache(maxsize=16)
def _init_fn(model_config: ModelConfig, policy: Policy, rng_impl: str):
    """The jitted ``model.init``, one per architecture (its compile is the slow part)."""
    model = MultiResolutionHAN(config=model_config, policy=policy)
    return jax.jit(lambda raw, x: model.init({"params": typed_key(raw, rng_impl)}, x, deterministic=True))


def create_train_state(rng: Array, config: StepConfig, inputs: Inputs) -> TrainState:
    """Initialises parameters (from one sample batch's shapes), log-variances and optimiser."""
    init_rng, state_rng = jax.random.split(rng)
    params = _init_fn(config.model, config.policy, config.rng_impl)(init_rng, inputs)["params"]
    log_vars = init_log_vars(config.aggregate.task_names, config.log_var_priors)
    opt_state = make_optimizer(config.optim).init({"model": params, "log_vars": log_vars})
    return TrainState(
        step=jnp.int32(0),
        epoch=jnp.int32(0),
        params=params,
        log_vars=log_vars,
        opt_state=opt_state,
        loss_scale=make_loss_scale(config.policy),
        rng=state_rng,
    )


def reset_accumulation(state: TrainState) -> TrainState:
    """Drops a partial gradient accumulation (the original's per-epoch ``zero_grad``)."""
    opt = state.opt_state
    opt = opt._replace(
        mini_step=jnp.zeros_like(opt.mini_step),
        acc_grads=jax.tree_util.tree_map(jnp.zeros_like, opt.acc_grads),
    )
    return state.replace(opt_state=opt)


# ---------------------------------------------------------------------------
# The shared path.
# ---------------------------------------------------------------------------

# Mean-valued metrics and the count each is weighted by when batches are combined.
METRIC_WEIGHTS = {
    "weighted_total": "n_rows",
    "simple_total": "n_rows",
    "data_term": "n_rows",
    "uncertainty_term": "n_rows",
    "reg_term": "n_rows",
    "regime_accuracy": "n/regime",
    "casualty_mae": "n/casualty",
    "anomaly_mse": "n/anomaly",
    "forecast_mse": "n/forecast",
    "high_obs/weighted_total": "high_obs/n_rows",
    "high_obs/simple_total": "high_obs/n_rows",
    "low_obs/weighted_total": "low_obs/n_rows",
    "low_obs/simple_total": "low_obs/n_rows",
}


def _losses_and_total(outputs, targets: Targets, log_vars, config: StepConfig, axis_name):
    losses, diag = compute_losses_with_diagnostics(outputs, targets, config.loss, axis_name=axis_name)
    total, info = aggregate(losses, log_vars, config.aggregate)
    return total, losses, info, diag


def _aggregate_metrics(prefix: str, losses: dict, info: AggregateInfo) -> dict:
    m = {
        f"{prefix}weighted_total": info.weighted_total,
        f"{prefix}simple_total": info.simple_total,
    }
    if prefix:
        return m
    m.update(data_term=info.data_term, uncertainty_term=info.uncertainty_term, reg_term=info.reg_term)
    for task, value in losses.items():
        m[f"loss/{task}"] = value
    for task, w in info.weight.items():
        m[f"weight/{task}"] = w
    for task, inc in info.included.items():
        m[f"included/{task}"] = inc.astype(jnp.float32)
    return m


def _task_metrics(outputs, targets: Targets, row, config: StepConfig, axis_name) -> dict:
    """Interpretable metrics on the last month, each with its valid count."""
    m = {}
    logits = outputs["regime_logits"][:, -1].astype(jnp.float32)
    k = logits.shape[-1]
    if targets.phase_index is not None and targets.phase_valid is not None:
        labels = regime_labels(targets.phase_index, k, config.loss.phase_to_coarse)
        valid = row & targets.phase_valid.astype(bool)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        m["regime_accuracy"], m["n/regime"] = masked_mean(correct, valid, axis_name=axis_name)
        one_hot = jax.nn.one_hot(labels, k)
        m["regime_class_correct"] = jax.vmap(lambda c: masked_sum(correct, valid & (labels == c), axis_name=axis_name))(jnp.arange(k))
        m["regime_class_count"] = jax.vmap(lambda c: masked_sum(one_hot[:, c], valid, axis_name=axis_name))(jnp.arange(k))
    else:
        m["regime_accuracy"] = m["n/regime"] = jnp.float32(0.0)
        m["regime_class_correct"] = m["regime_class_count"] = jnp.zeros((k,), jnp.float32)
    m["regime_balanced_accuracy"] = balanced_accuracy(m["regime_class_correct"], m["regime_class_count"])

    score = outputs["anomaly_score"][:, -1, 0].astype(jnp.float32)
    if targets.is_transition is not None and targets.phase_valid is not None:
        valid = row & targets.phase_valid.astype(bool)
        y = targets.is_transition.astype(jnp.float32)
        pred = (score > 0.0).astype(jnp.float32)  # sigmoid(score) > 0.5
        m["transition_positives"] = masked_sum(y, valid, axis_name=axis_name)
        m["transition_predicted_positives"] = masked_sum(pred, valid, axis_name=axis_name)
        m["transition_true_positives"] = masked_sum(pred * y, valid, axis_name=axis_name)
        m["n/transition"] = masked_sum(jnp.ones_like(y), valid, axis_name=axis_name)
    else:
        m.update({key: jnp.float32(0.0) for key in ("transition_positives", "transition_predicted_positives",
                                                    "transition_true_positives", "n/transition")})

    if targets.fatalities is not None and targets.casualty_valid is not None:
        valid = row & targets.casualty_valid.astype(bool)
        pi, mu, _ = zinb_parameters(outputs["casualty_pred"][:, -1].astype(jnp.float32),
                                    outputs["casualty_var"][:, -1].astype(jnp.float32))
        expected = (1.0 - pi) * mu * config.loss.casualty_target_scale
        err = jnp.abs(expected - jnp.where(valid, targets.fatalities, 0.0))
        m["casualty_mae"], m["n/casualty"] = masked_mean(err, valid, axis_name=axis_name)
    else:
        m["casualty_mae"] = m["n/casualty"] = jnp.float32(0.0)

    if targets.anomaly is not None and targets.anomaly_valid is not None:
        valid = row & targets.anomaly_valid.astype(bool)
        err = jnp.square(jnp.clip(score, -10.0, 10.0) - jnp.where(valid, targets.anomaly, 0.0))
        m["anomaly_mse"], m["n/anomaly"] = masked_mean(err, valid, axis_name=axis_name)
    else:
        m["anomaly_mse"] = m["n/anomaly"] = jnp.float32(0.0)

    if targets.forecast_targets is not None and targets.forecast_masks is not None:
        pred = outputs["forecast_pred"].astype(jnp.float32)
        f = min(pred.shape[-1], targets.forecast_targets.shape[-1])
        valid = targets.forecast_masks[..., :f].astype(bool) & row[:, None, None]
        err = jnp.square(pred[..., :f] - jnp.where(valid, targets.forecast_targets[..., :f], 0.0))
        m["forecast_mse"], m["n/forecast"] = masked_mean(err, valid, axis_name=axis_name)
    else:
        m["forecast_mse"] = m["n/forecast"] = jnp.float32(0.0)
    return m


def balanced_accuracy(class_correct: Array, class_count: Array) -> Array:
    """Mean recall over the classes present (0 when none is)."""
    present = class_count > 0
    recall = class_correct / jnp.maximum(class_count, 1.0)
    return jnp.sum(jnp.where(present, recall, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def _shared_forward(params, log_vars, inputs: Inputs, targets: Targets, rng, *, config: StepConfig,
                    deterministic: bool, axis_name: Optional[str]):
    """Model -> compute_losses -> aggregate -> metrics: the one path of every phase."""
    model = make_model(config)
    rngs = None if deterministic else {"dropout": rng}
    outputs = model.apply({"params": params}, inputs, deterministic=deterministic, rngs=rngs)
    row = targets.sample_mask.astype(bool)
    total, losses, info, diag = _losses_and_total(outputs, targets, log_vars, config, axis_name)
    metrics = _aggregate_metrics("", losses, info)
    n_rows = masked_sum(row.astype(jnp.float32), None, axis_name=axis_name)
    metrics["n_rows"] = n_rows
    metrics["nan_in_outputs"] = diag.nan_in_outputs.astype(jnp.float32)
    metrics.update(_task_metrics(outputs, targets, row, config, axis_name))

    # validate()'s observation-rate split, per row: the same shared total on the
    # rows of each stratum (the original filed whole-batch totals by row).
    obs = targets.monthly_obs_rate
    for name, keep in (("high_obs", lambda r: r > HIGH_OBS_RATE), ("low_obs", lambda r: r < LOW_OBS_RATE)):
        sub_row = row & (keep(obs) if obs is not None else jnp.zeros_like(row))
        sub_targets = targets.replace(sample_mask=sub_row)
        _, sub_losses, sub_info, _ = _losses_and_total(outputs, sub_targets, log_vars, config, axis_name)
        metrics.update(_aggregate_metrics(f"{name}/", sub_losses, sub_info))
        metrics[f"{name}/n_rows"] = masked_sum(sub_row.astype(jnp.float32), None, axis_name=axis_name)
    return total, outputs, metrics


def _source_dropout(inputs: Inputs, rng, config: StepConfig) -> Inputs:
    """Phase-2 SourceDropout: one draw per batch zeroes each listed monthly source."""
    reg = config.regularization
    feats, masks = dict(inputs.monthly_features), dict(inputs.monthly_masks)
    for i, name in enumerate(reg.source_dropout_sources):
        if name not in feats:
            raise ValueError(
                f"source dropout: monthly source {name!r} is not in the batch; it has {sorted(feats)}"
            )
        drop = jax.random.bernoulli(jax.random.fold_in(rng, i), reg.source_dropout_prob)
        feats[name] = jnp.where(drop, jnp.zeros_like(feats[name]), feats[name])
        masks[name] = jnp.where(drop, jnp.zeros_like(masks[name]), masks[name])
    return inputs.replace(monthly_features=feats, monthly_masks=masks)


def train_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: StepConfig,
               axis_name: Optional[str] = None, deterministic: bool = False):
    """One micro-batch: gradients of the shared objective, accumulated by MultiSteps.

    Args:
      state: the train state.
      inputs, targets: one batch (padding rows have ``sample_mask`` False).
      config: the static step configuration (model, policy, losses, optimiser).
      axis_name: the pmap axis, or None.
      deterministic: switch dropout off (used to prove the shared path).

    Returns:
      (new state, metrics): the shared metric keys plus ``objective``,
      ``temporal_reg``, ``learning_rate``, ``skipped_step``, ``grad_norm``
      and ``loss_scale``.
    """
    rng, dropout_rng, source_rng = jax.random.split(state.rng, 3)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    dropout_rng = typed_key(dropout_rng, config.rng_impl)
    if config.regularization.source_dropout and not deterministic:
        inputs = _source_dropout(inputs, source_rng, config)
    optim = config.optim

    def objective_fn(trainable):
        total, outputs, metrics = _shared_forward(
            trainable["model"], trainable["log_vars"], inputs, targets, dropout_rng,
            config=config, deterministic=deterministic, axis_name=axis_name,
        )
        reg = config.regularization
        if reg.temporal_reg:
            temporal, _ = temporal_regularization(
                outputs, targets.sample_mask.astype(bool), correlation_weight=reg.temporal_corr_weight,
                smoothness_weight=reg.temporal_smooth_weight, axis_name=axis_name,
            )
        else:
            temporal = jnp.float32(0.0)
        objective = total + temporal
        # The original's guard: a huge objective is rescaled to 1000 by a detached
        # factor, so the gradient keeps its direction but not its size.
        guarded = jnp.where(
            objective > optim.loss_guard_threshold,
            objective * (optim.loss_guard_target / jax.lax.stop_gradient(objective)),
            objective,
        )
        metrics = dict(metrics, temporal_reg=temporal, objective=objective)
        return state.loss_scale.scale(guarded), metrics

    trainable = {"model": state.params, "log_vars": state.log_vars}
    grads, metrics = jax.grad(objective_fn, has_aux=True)(trainable)
    grads = state.loss_scale.unscale(grads)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    finite = all_finite(grads)
    # Non-finite gradients must not reach the optimiser: feed zeros and discard the result.
    safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)

    tx = make_optimizer(optim)
    updates, new_opt_state = tx.update(safe_grads, state.opt_state, trainable)
    schedule = learning_rate_schedule(optim)
    if optim.schedule_unit == "epoch":
        lr = schedule(state.epoch)
    else:
        # Optimiser updates applied so far: the update this step may complete is the next one.
        lr = schedule(state.opt_state.gradient_step)
    updates = {
        "model": jax.tree_util.tree_map(lambda u: u * lr.astype(u.dtype), updates["model"]),
        "log_vars": jax.tree_util.tree_map(lambda u: u * (lr * optim.log_var_lr_multiplier).astype(u.dtype),
                                           updates["log_vars"]),
    }
    new_trainable = optax.apply_updates(trainable, updates)

    def keep_if_finite(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(new_trainable["model"], state.params),
        log_vars=keep_if_finite(new_trainable["log_vars"], state.log_vars),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        loss_scale=state.loss_scale.adjust(finite),
        rng=rng,
    )
    metrics.update(
        learning_rate=lr,
        skipped_step=(~finite).astype(jnp.float32),
        grad_norm=optax.tree.norm(safe_grads["model"]),
        loss_scale=jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
    )
    return new_state, metrics


def eval_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: StepConfig,
              axis_name: Optional[str] = None):
    """Validation metrics: the shared path with dropout off."""
    _, _, metrics = _shared_forward(state.params, state.log_vars, inputs, targets, None,
                                    config=config, deterministic=True, axis_name=axis_name)
    return metrics


def test_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: StepConfig,
              axis_name: Optional[str] = None):
    """Test metrics (the same as :func:`eval_step`) plus per-row predictions for reports."""
    _, outputs, metrics = _shared_forward(state.params, state.log_vars, inputs, targets, None,
                                          config=config, deterministic=True, axis_name=axis_name)
    pi, mu, theta = zinb_parameters(outputs["casualty_pred"][:, -1].astype(jnp.float32),
                                    outputs["casualty_var"][:, -1].astype(jnp.float32))
    predictions = {
        "regime_probs": jax.nn.softmax(outputs["regime_logits"][:, -1].astype(jnp.float32), axis=-1),
        "zinb_pi": pi,
        "zinb_mu": mu,
        "zinb_theta": theta,
        "expected_fatalities": (1.0 - pi) * mu * config.loss.casualty_target_scale,
        "anomaly_logit": outputs["anomaly_score"][:, -1, 0].astype(jnp.float32),
        "sample_mask": targets.sample_mask,
    }
    return metrics, predictions


# Keep pytest from collecting the step function named test_step.
test_step.__test__ = False


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled steps for one configuration."""

    train: Any
    train_deterministic: Any
    eval: Any
    test: Any
    axis_name: Optional[str]


@functools.lru_cache(maxsize=16)
def jit_steps(config: StepConfig) -> Steps:
    """The three steps jitted for one device; the state buffer is donated in training.

    Cached per (hashable) configuration, so every caller shares one compilation.
    """
    return Steps(
        train=jax.jit(functools.partial(train_step, config=config), donate_argnums=0),
        train_deterministic=jax.jit(functools.partial(train_step, config=config, deterministic=True)),
        eval=jax.jit(functools.partial(eval_step, config=config)),
        test=jax.jit(functools.partial(test_step, config=config)),
        axis_name=None,
    )


@functools.lru_cache(maxsize=16)
def pmap_steps(config: StepConfig, axis_name: str = "batch") -> Steps:
    """The three steps over local devices; inputs carry a leading device axis."""
    return Steps(
        train=jax.pmap(functools.partial(train_step, config=config, axis_name=axis_name), axis_name=axis_name,
                       donate_argnums=0),
        train_deterministic=jax.pmap(
            functools.partial(train_step, config=config, axis_name=axis_name, deterministic=True),
            axis_name=axis_name),
        eval=jax.pmap(functools.partial(eval_step, config=config, axis_name=axis_name), axis_name=axis_name),
        test=jax.pmap(functools.partial(test_step, config=config, axis_name=axis_name), axis_name=axis_name),
        axis_name=axis_name,
    )
