"""Jitted train, eval and test steps on one shared loss path.

The audit (``docs/audit.md`` section 1) found that the original's
``train_epoch``, ``validate`` and ``evaluate`` each built their totals
differently. Here :func:`_shared_forward` (model -> ``compute_losses`` ->
``aggregate`` -> metrics, under the configured precision policy) is the only
place a total is formed, and :func:`train_step`, :func:`eval_step` and
:func:`test_step` all call it. They return the same metric keys; train adds
what only training has (objective, temporal regulariser, learning rate,
skipped-step flag), test adds per-row predictions.

Every step takes the run's :class:`~han_jax.config.Config` as a static
argument, and ``axis_name``. The same body runs in three layouts
(:mod:`han_jax.parallel`): :func:`jit_steps` on one device;
:func:`sharded_steps`, jit over a mesh with the batch's rows sharded, where the
step sees the global batch and needs no ``axis_name``; and :func:`pmap_steps`,
where the batch statistics of the losses and the metrics are taken across
devices over ``axis_name`` and gradients are ``pmean``-ed. In every layout N
devices holding B/N rows give the metrics and updated parameters of one
device holding all B rows.

The update belongs to optax (:func:`make_optimizer`): train_step reads
grad -> flat group vectors (:func:`optimizer_view`) -> (pmean) -> ``tx.update``
-> ``apply_updates`` -> parameter trees.

Deliberate differences from the original trainer:
  * A micro-batch whose gradients are not finite changes neither parameters
    nor optimiser moments nor the accumulation, and is counted
    (``optax.apply_if_finite``; the original relied on GradScaler, which it
    only had for float16).
  * Gradient accumulation uses ``optax.MultiSteps``; the trainer resets a
    partial accumulation at each epoch start (:func:`start_epoch`), as the
    original's ``grad_accumulator.zero_grad()`` did.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from han_jax.aggregate import aggregate, init_log_vars
from han_jax.batch import Inputs, Targets
from han_jax.compilation_cache import persistent
from han_jax.config import Config, OptimConfig
from han_jax.losses import compute_losses, temporal_regularization, zinb_parameters
from han_jax.metrics import batch_statistics, metrics_from_statistics
from han_jax.model import MultiResolutionHAN
from han_jax.precision import make_loss_scale

Array = jax.Array

# apply_if_finite gives up and applies a non-finite update after this many in a
# row; at int32's maximum (its counter saturates there) it never does.
_NEVER_APPLY_NON_FINITE = 2**31 - 1


@flax.struct.dataclass
class TrainState:
    """All that changes during training; a pytree, checkpointed whole.

    Attributes:
      step: micro-batches seen (train_step calls).
      params: model parameters.
      log_vars: ``{task: scalar}`` Kendall log-variances.
      opt_state: the state of :func:`make_optimizer`'s transformation
        (``apply_if_finite`` around ``MultiSteps`` around the AdamW groups; the
        learning rate is its injected hyperparameter), over the flat group
        vectors of :func:`optimizer_view`.
      loss_scale: :class:`~han_jax.precision.NoOpLossScale` or dynamic (f16).
      rng: key for dropout and source dropout.
    """

    step: Array
    params: Any
    log_vars: dict
    opt_state: Any
    loss_scale: Any
    rng: Array


def typed_key(raw_key: Array, impl: str) -> Array:
    """A key of ``impl`` seeded by one draw from the state's (threefry) key."""
    return jax.random.key(jax.random.bits(raw_key, (), jnp.uint32), impl=impl)


def make_model(config: Config) -> MultiResolutionHAN:
    return MultiResolutionHAN(config=config.model, policy=config.step.policy)


def learning_rate_schedule(optim: OptimConfig, *, num_epochs: int) -> optax.Schedule:
    """The original's ``WarmupCosineScheduler``, built from optax's.

    Linear warmup from ``learning_rate * 0.01`` over ``min(warmup_epochs,
    num_epochs - 1)`` epochs (the trainer's effective warmup), then cosine
    decay to ``min_lr`` at ``num_epochs``. In ``"step"`` mode the same curve is
    stretched over optimiser updates.

    A one-epoch run has no warmup: its epoch starts the decay at
    ``learning_rate``. A warmup epoch would leave no epoch to decay over (optax
    refuses a cosine of length 0) and would train only at ``learning_rate *
    0.01``. Runs of two epochs or more get the original's curve unchanged.
    """
    warmup = max(0, min(optim.warmup_epochs, num_epochs - 1))
    total = num_epochs
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


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The whole update as one optax transformation over ``{"model", "log_vars"}``.

    From the outside in:
      * ``apply_if_finite``: a micro-batch with a non-finite gradient leaves
        everything inside untouched (it is never applied, however many come
        in a row); ``last_finite`` and ``total_notfinite`` record it.
      * ``MultiSteps``: ``accumulation_steps`` micro-batches per update.
      * ``inject_hyperparams``: the learning rate lives in the state. With
        ``schedule_unit="step"`` optax evaluates the schedule at each update;
        with ``"epoch"`` (the original's per-epoch ``scheduler.step()``)
        :func:`start_epoch` writes the epoch's value.
      * per group (``multi_transform``): the model's gradients are clipped to
        ``max_grad_norm`` (the original clipped model parameters only), then
        AdamW; the log-variances get their own AdamW scaled by
        ``log_var_lr_multiplier`` (AdamW's update is linear in the learning
        rate, so this is AdamW at the multiplied rate).

    It is given each group as one flat vector (:func:`optimizer_view`), not the
    parameter tree: the same maths (the global norm and AdamW are elementwise or
    whole-vector, and the finite check and accumulation are elementwise), in a
    handful of ops instead of several per parameter leaf. Compiled alone on 2
    cores, the default model's update took 32.5 s and 6,502 fusions on its 701
    leaves, and takes 13.6 s and 738 fusions on the flat view
    (``benchmarks/bench_update_compile.py``; the train step's whole compile
    went from 107.8 s to 66.3 s, ``benchmarks/README.md``).
    """
    optim = config.step.optim
    schedule = learning_rate_schedule(optim, num_epochs=config.train.epochs)

    def groups(learning_rate):
        def adamw():
            return optax.adamw(learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=optim.weight_decay)

        return optax.multi_transform(
            {
                # flatten: multi_transform hands each group the whole dict with the other
                # group masked; flattening keeps the moments one vector (as checkpoints hold them).
                "model": optax.flatten(optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw())),
                "log_vars": optax.flatten(optax.chain(adamw(), optax.scale(optim.log_var_lr_multiplier))),
            },
            {"model": "model", "log_vars": "log_vars"},
        )

    learning_rate = schedule if optim.schedule_unit == "step" else schedule(0)
    tx = optax.inject_hyperparams(groups)(learning_rate=learning_rate)
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulation_steps)
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_APPLY_NON_FINITE)


def optimizer_view(trainable: dict) -> dict:
    """``{"model": tree, "log_vars": tree}`` -> each group as one flat vector: what :func:`make_optimizer` sees.

    The vectors are ``jax.flatten_util.ravel_pytree``'s, so :func:`from_optimizer_view`
    puts them back into the groups' trees.
    """
    return {group: ravel_pytree(tree)[0] for group, tree in trainable.items()}


def from_optimizer_view(flat: dict, like: dict) -> dict:
    """Inverse of :func:`optimizer_view`: flat group vectors back into the trees of ``like``.

    On CPU each leaf is a ``dynamic_slice`` of its group's vector at an offset XLA only
    sees at run time (:func:`_run_time_offsets`), where ``ravel_pytree`` slices at static
    offsets. XLA:CPU compiles one kernel per distinct fused computation, and a static
    offset is part of it, so the default model's 701 leaves were 701 kernels to compile;
    with run-time offsets the leaves of one shape share one (53 shapes). The update alone
    (``benchmarks/bench_update_compile.py``): 732 kernels and 13.5 s to compile before,
    89 and 4.8 s now; the train step's kernels 2,106 -> 1,463 (issue 15, fourth round, in
    ``benchmarks/README.md``). Other backends keep static slices: a conditional there can
    cost a device-to-host sync of its predicate. The values are the same either way.

    Raises:
      ValueError: a vector that does not hold exactly its group's leaves.
    """
    trees = {}
    for group, vector in flat.items():
        leaves, treedef = jax.tree_util.tree_flatten(like[group])
        sizes = [int(np.size(leaf)) for leaf in leaves]
        dtype = jnp.result_type(*leaves) if leaves else vector.dtype
        if vector.shape != (sum(sizes),) or vector.dtype != dtype:
            raise ValueError(f"optimiser view of {group!r}: expected a {dtype}[{sum(sizes)}] vector for its "
                             f"{len(leaves)} leaves, got {vector.dtype}{list(vector.shape)}")

        def rebuild(vector, run_time: bool, leaves=leaves, sizes=sizes):
            offsets = _run_time_offsets(sizes, vector) if run_time else _offsets(sizes)
            return [jax.lax.dynamic_slice(vector, (offset,), (size,)).reshape(np.shape(leaf)).astype(leaf.dtype)
                    for offset, size, leaf in zip(offsets, sizes, leaves)]

        rebuilt = jax.lax.platform_dependent(vector, cpu=functools.partial(rebuild, run_time=True),
                                             default=functools.partial(rebuild, run_time=False))
        trees[group] = jax.tree_util.tree_unflatten(treedef, rebuilt)
    return trees


def _offsets(sizes: list) -> tuple:
    """The start offset of each of ``sizes`` in their concatenation."""
    return tuple(int(o) for o in np.cumsum([0] + list(sizes[:-1])))


def _run_time_offsets(sizes: list, vector: Array) -> tuple:
    """:func:`_offsets` as values XLA cannot fold into kernels.

    They are the outputs of a ``lax.cond`` whose two branches are the same constants
    and whose predicate depends on ``vector``, so either branch gives the same values.
    ``optimization_barrier`` would say this more plainly, but XLA:CPU removes barriers
    before it folds constants. Should a later XLA simplify the conditional away, the
    offsets become static again: slower to compile, the same values. Under ``vmap`` the
    conditional becomes a select and the slices gathers: the same values, slower.
    """
    offsets = _offsets(sizes)
    if vector.size == 0 or sum(sizes) >= 2**31:  # nothing to slice, or offsets past int32: static ones
        return offsets

    def constants():
        return tuple(jnp.int32(o) for o in offsets)

    return jax.lax.cond(vector[0] > 0, constants, constants)


def _with_accumulator(state: "TrainState", convert) -> "TrainState":
    multi = state.opt_state.inner_state  # apply_if_finite -> MultiSteps
    trainable = {"model": state.params, "log_vars": state.log_vars}
    multi = multi._replace(acc_grads=convert(multi.acc_grads, trainable))
    return state.replace(opt_state=state.opt_state._replace(inner_state=multi))


def with_tree_accumulator(state: "TrainState") -> "TrainState":
    """``state`` in the checkpoint layout of han-jax before :func:`optimizer_view`.

    The optimiser then saw the parameter trees, so ``MultiSteps``' accumulated
    gradients were trees; every other part of the state was already one vector per
    group. Restoring an older checkpoint asks for this layout (through
    ``jax.eval_shape``), then :func:`with_flat_accumulator` converts it, losslessly.
    """
    return _with_accumulator(state, from_optimizer_view)


def with_flat_accumulator(state: "TrainState") -> "TrainState":
    """Inverse of :func:`with_tree_accumulator`: the accumulated gradients as flat group vectors."""
    return _with_accumulator(state, lambda acc, trainable: optimizer_view(acc))


def _hyperparams(opt_state) -> dict:
    """``inject_hyperparams``' values inside :func:`make_optimizer`'s state."""
    return opt_state.inner_state.inner_opt_state.hyperparams


def current_learning_rate(opt_state) -> Array:
    """The learning rate in the optimiser state (the last update's in ``"step"`` mode)."""
    return _hyperparams(opt_state)["learning_rate"]


@functools.lru_cache(maxsize=16)
def _init_fn(model_config, policy, rng_impl: str):
    """The jitted ``model.init``, one per architecture (its compile is the slow part)."""
    model = MultiResolutionHAN(config=model_config, policy=policy)
    return persistent(jax.jit(lambda raw, x: model.init({"params": typed_key(raw, rng_impl)}, x, deterministic=True)),
                      "model_init", (model_config, policy, rng_impl))


@functools.lru_cache(maxsize=16)
def _optimizer_init_fn(config: Config):
    """``make_optimizer(config).init``: stored with the steps when the compilation cache is on.

    Eager otherwise: run eagerly it dispatches one small op per parameter leaf (4.5 s for the small
    model in a fresh process), but those ops are shared by every configuration of a process, where a
    jitted init would compile once per configuration (the tests build dozens).
    """
    init = make_optimizer(config).init
    return persistent(jax.jit(init), "optimizer_init", config, without_store=init)


def init_optimizer(config: Config, params, log_vars: dict):
    """:func:`make_optimizer`'s initial state for these parameters, over :func:`optimizer_view`'s flat groups."""
    return _optimizer_init_fn(config)(optimizer_view({"model": params, "log_vars": log_vars}))


def create_train_state(rng: Array, config: Config, inputs: Inputs) -> TrainState:
    """Initialises parameters (from one sample batch's shapes), log-variances and optimiser."""
    init_rng, state_rng = jax.random.split(rng)
    params = _init_fn(config.model, config.step.policy, config.step.rng_impl)(init_rng, inputs)["params"]
    log_vars = init_log_vars(config.step.aggregate.task_names, config.step.log_var_priors)
    opt_state = init_optimizer(config, params, log_vars)
    return TrainState(
        step=jnp.int32(0),
        params=params,
        log_vars=log_vars,
        opt_state=opt_state,
        loss_scale=make_loss_scale(config.step.policy),
        rng=state_rng,
    )


def start_epoch(state: TrainState, epoch: Array, *, config: Config) -> TrainState:
    """The original's per-epoch ``scheduler.step()`` and ``zero_grad()``.

    Writes the epoch's learning rate into the optimiser state (``"epoch"`` unit)
    and drops a partial gradient accumulation.
    """
    optim = config.step.optim
    multi = state.opt_state.inner_state  # apply_if_finite -> MultiSteps
    inject = multi.inner_opt_state
    if optim.schedule_unit == "epoch":
        lr = learning_rate_schedule(optim, num_epochs=config.train.epochs)(epoch)
        inject = inject._replace(hyperparams={**inject.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
    multi = multi._replace(mini_step=jnp.zeros_like(multi.mini_step), inner_opt_state=inject,
                           acc_grads=jax.tree_util.tree_map(jnp.zeros_like, multi.acc_grads))
    return state.replace(opt_state=state.opt_state._replace(inner_state=multi))


# ---------------------------------------------------------------------------
# The shared path.
# ---------------------------------------------------------------------------


def _shared_forward(params, log_vars, inputs: Inputs, targets: Targets, rng, *, config: Config,
                    deterministic: bool, axis_name: Optional[str]):
    """Model -> compute_losses -> aggregate, and the batch's statistics -> metrics: the one path of every phase.

    Returns:
      (total, outputs, statistics, metrics): the batch's Kendall total (the
      objective, with gradient), the model outputs, the batch's
      :func:`~han_jax.metrics.batch_statistics` and the metrics they give.
    """
    rngs = None if deterministic else {"dropout": rng}
    outputs = make_model(config).apply({"params": params}, inputs, deterministic=deterministic, rngs=rngs)
    losses = compute_losses(outputs, targets, config.step.loss, axis_name=axis_name)
    total, _ = aggregate(losses, log_vars, config.step.aggregate)
    statistics = jax.lax.stop_gradient(batch_statistics(outputs, targets, config=config, axis_name=axis_name))
    metrics = metrics_from_statistics(statistics, jax.lax.stop_gradient(log_vars), config=config)
    return total, outputs, statistics, metrics


def _source_dropout(inputs: Inputs, rng, config: Config) -> Inputs:
    """Phase-2 SourceDropout: one draw per batch zeroes each listed monthly source."""
    reg = config.step.regularization
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


def train_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: Config,
               axis_name: Optional[str] = None, deterministic: bool = False):
    """One micro-batch: gradients of the shared objective, handed to optax.

    Args:
      state: the train state.
      inputs, targets: one batch (padding rows have ``sample_mask`` False).
      config: the run's configuration (static).
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
    dropout_rng = typed_key(dropout_rng, config.step.rng_impl)
    reg, optim = config.step.regularization, config.step.optim
    if reg.source_dropout and not deterministic:
        inputs = _source_dropout(inputs, source_rng, config)

    def objective_fn(trainable):
        total, outputs, _, metrics = _shared_forward(
            trainable["model"], trainable["log_vars"], inputs, targets, dropout_rng,
            config=config, deterministic=deterministic, axis_name=axis_name,
        )
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
    # From here on each group is one vector (optimizer_view): one pmean, one finite
    # check and one update per group instead of one per parameter leaf.
    grads = state.loss_scale.unscale(optimizer_view(grads))
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    flat = optimizer_view(trainable)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, flat)
    trainable = from_optimizer_view(optax.apply_updates(flat, updates), trainable)

    finite = opt_state.last_finite
    new_state = state.replace(
        step=state.step + 1,
        params=trainable["model"],
        log_vars=trainable["log_vars"],
        opt_state=opt_state,
        loss_scale=state.loss_scale.adjust(finite),
        rng=rng,
    )
    metrics.update(
        learning_rate=current_learning_rate(opt_state),
        skipped_step=(~finite).astype(jnp.float32),
        grad_norm=jnp.where(finite, optax.tree.norm(grads["model"]), 0.0),
        loss_scale=jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
    )
    return new_state, metrics


@flax.struct.dataclass
class EvalOutput:
    """What :func:`eval_step` and :func:`test_step` return.

    Attributes:
      metrics: the batch's own numbers (the keys of ``train_step``'s metrics,
        without the optimiser extras).
      statistics: the batch's :func:`~han_jax.metrics.batch_statistics`; a
        :class:`~han_jax.metrics.SplitAccumulator` merges them into the exact
        metrics of a whole split.
      predictions: per-row predictions (``test_step``; empty for ``eval_step``).
    """

    metrics: dict
    statistics: dict
    predictions: dict


def eval_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: Config,
              axis_name: Optional[str] = None) -> EvalOutput:
    """Validation: the shared path with dropout off."""
    _, _, statistics, metrics = _shared_forward(state.params, state.log_vars, inputs, targets, None,
                                                config=config, deterministic=True, axis_name=axis_name)
    return EvalOutput(metrics=metrics, statistics=statistics, predictions={})


def row_predictions(outputs: dict, config: Config) -> dict:
    """Per-row predictions of the anchor (the window's last month) from the model's outputs.

    The same reading of the heads as the losses and metrics: the ZINB parameters
    of :func:`~han_jax.losses.zinb_parameters` and the expected fatalities
    ``(1 - pi) * mu * casualty_target_scale``; the transition probability is the
    sigmoid of the anomaly head's logit, clipped as the transition loss clips it
    (the original has no transition head of its own, ``docs/model.md``).

    Args:
      outputs: the model's output dict.
      config: the run's configuration.

    Returns:
      f32 arrays: ``regime_probs [B, K]``, ``transition_prob [B]``, ``zinb_pi``,
      ``zinb_mu`` (in units of ``casualty_target_scale`` fatalities),
      ``zinb_theta``, ``expected_fatalities [B]`` (fatalities), ``anomaly_logit [B]``
      (the anomaly score), ``forecast_next [B, Ff]`` (the next month of the monthly
      features, normalised) and, only with the direct daily head
      (``use_latent_forecast=False``), ``daily_forecast [B, H, Fd]`` (days t+1..t+H,
      normalised, daily sources in sorted name order as its targets). The latent
      head predicts latent states, not features, so it gives no prediction here.
    """
    pi, mu, theta = zinb_parameters(outputs["casualty_pred"][:, -1].astype(jnp.float32),
                                    outputs["casualty_var"][:, -1].astype(jnp.float32))
    score = outputs["anomaly_score"][:, -1, 0].astype(jnp.float32)
    predictions = {
        "regime_probs": jax.nn.softmax(outputs["regime_logits"][:, -1].astype(jnp.float32), axis=-1),
        "transition_prob": jax.nn.sigmoid(jnp.clip(score, -50.0, 50.0)),
        "zinb_pi": pi,
        "zinb_mu": mu,
        "zinb_theta": theta,
        "expected_fatalities": (1.0 - pi) * mu * config.step.loss.casualty_target_scale,
        "anomaly_logit": score,
        "forecast_next": outputs["forecast_pred"][:, -1].astype(jnp.float32),
    }
    if not config.model.use_latent_forecast:
        predictions["daily_forecast"] = outputs["daily_forecast_pred"].astype(jnp.float32)
    return predictions


def test_step(state: TrainState, inputs: Inputs, targets: Targets, *, config: Config,
              axis_name: Optional[str] = None) -> EvalOutput:
    """Test: :func:`eval_step` plus per-row predictions for reports.

    ``predictions``: :func:`row_predictions` and ``sample_mask [B]``.
    """
    _, outputs, statistics, metrics = _shared_forward(state.params, state.log_vars, inputs, targets, None,
                                                      config=config, deterministic=True, axis_name=axis_name)
    predictions = dict(row_predictions(outputs, config), sample_mask=targets.sample_mask)
    return EvalOutput(metrics=metrics, statistics=statistics, predictions=predictions)


# Keep pytest from collecting the step function named test_step.
test_step.__test__ = False


@functools.lru_cache(maxsize=16)
def jit_forward(config: Config):
    """``forward(params, inputs) -> outputs``: the model, deterministic (dropout off), jitted once per config."""
    model = make_model(config)
    return persistent(jax.jit(lambda params, inputs: model.apply({"params": params}, inputs, deterministic=True)),
                      "forward", config)


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled steps for one configuration.

    ``train(state, inputs, targets) -> (state, metrics)``; ``eval`` and ``test``
    ``(state, inputs, targets) -> EvalOutput``; ``start_epoch(state, epoch) -> state``.
    """

    train: Any
    train_deterministic: Any
    eval: Any
    test: Any
    start_epoch: Any
    axis_name: Optional[str]


@functools.lru_cache(maxsize=16)
def jit_steps(config: Config) -> Steps:
    """The steps jitted for one device; the state buffer is donated in training.

    Cached per (hashable) configuration, so every caller shares one compilation.
    """
    return Steps(
        train=persistent(jax.jit(functools.partial(train_step, config=config), donate_argnums=0), "train_step",
                         config),
        train_deterministic=persistent(jax.jit(functools.partial(train_step, config=config, deterministic=True)),
                                       "train_step_deterministic", config),
        eval=persistent(jax.jit(functools.partial(eval_step, config=config)), "eval_step", config),
        test=persistent(jax.jit(functools.partial(test_step, config=config)), "test_step", config),
        start_epoch=persistent(jax.jit(functools.partial(start_epoch, config=config)), "start_epoch", config),
        axis_name=None,
    )


@functools.lru_cache(maxsize=16)
def sharded_steps(config: Config, mesh: jax.sharding.Mesh, data_axis: str = "data") -> Steps:
    """The steps jitted over ``mesh``: batches sharded along rows on ``data_axis``, the state replicated.

    The body is :func:`jit_steps`' own, in the global view: XLA partitions it and
    adds the cross-device reductions the batch statistics and gradients need.
    Every output (state, metrics, statistics, per-row predictions) comes back
    replicated, so each process can read all of it.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(data_axis))

    def jitted(fn, name, donate_argnums=(), **kw):
        return persistent(jax.jit(functools.partial(fn, config=config, **kw), in_shardings=(replicated, rows, rows),
                                  out_shardings=replicated, donate_argnums=donate_argnums),
                          f"sharded_{name}", (config, mesh, data_axis))

    return Steps(
        train=jitted(train_step, "train_step", donate_argnums=0),
        train_deterministic=jitted(train_step, "train_step_deterministic", deterministic=True),
        eval=jitted(eval_step, "eval_step"),
        test=jitted(test_step, "test_step"),
        start_epoch=persistent(jax.jit(functools.partial(start_epoch, config=config),
                                       in_shardings=(replicated, replicated), out_shardings=replicated),
                               "sharded_start_epoch", (config, mesh, data_axis)),
        axis_name=None,
    )


@functools.lru_cache(maxsize=16)
def pmap_steps(config: Config, axis_name: str = "batch") -> Steps:
    """The steps over local devices; inputs and the state carry a leading device axis."""

    def pmapped(fn, **kw):
        return jax.pmap(functools.partial(fn, config=config, axis_name=axis_name), axis_name=axis_name, **kw)

    return Steps(
        train=pmapped(train_step, donate_argnums=0),
        train_deterministic=jax.pmap(functools.partial(train_step, config=config, axis_name=axis_name,
                                                       deterministic=True), axis_name=axis_name),
        eval=pmapped(eval_step),
        test=pmapped(test_step),
        start_epoch=jax.pmap(functools.partial(start_epoch, config=config)),
        axis_name=axis_name,
    )
