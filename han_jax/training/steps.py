"""The train, eval and test steps: one shared path from the model through the objective to the metrics.

The audit (``docs/audit.md`` section 1) found that the original's ``train_epoch``,
``validate`` and ``evaluate`` each built their totals differently. Here :func:`shared_path`
(model -> :func:`~han_jax.objective.forward_statistics` -> aggregate, under the precision
policy) is the only place a total is formed; :func:`train_step` differentiates it and
:func:`eval_step` / :func:`test_step` evaluate it, and all three read their metrics from
its statistics with :func:`~han_jax.objective.metrics_from_statistics`. They return the
same metric keys; train adds what only training has (objective, temporal regulariser,
learning rate, skipped-step flag, gradient norm, loss scale), test adds per-row predictions.

Every step takes a :class:`~han_jax.training.spec.StepSpec` as its static argument and the
learning-rate :class:`~han_jax.training.schedule.Schedule` as a run-time one, and
``axis_name``: :mod:`han_jax.training.devices` runs the same bodies on one device, jitted
over a device mesh (the step sees the global batch; no ``axis_name``) or under ``pmap``
(batch statistics and gradients reduced over ``axis_name``). In every layout N devices
holding B/N rows give the metrics and updated parameters of one device holding all B.

The update belongs to optax (:func:`make_optimizer`): grad -> flat group vectors
(:func:`optimizer_view`) -> (pmean) -> ``tx.update`` -> ``apply_updates`` -> parameter trees.

Deliberate differences from the original trainer:
  * A micro-batch whose gradients are not finite changes neither parameters nor
    optimiser moments nor the accumulation, and is counted (``optax.apply_if_finite``;
    the original relied on GradScaler, which it only had for float16).
  * Gradient accumulation uses ``optax.MultiSteps``; :func:`start_epoch` resets a partial
    accumulation at each epoch start, as the original's ``grad_accumulator.zero_grad()`` did.
  * The log-variance group trains at ``log_var_lr_multiplier`` (10x) the learning rate, as
    the original meant (its scheduler overwrote the group's rate to 1x).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from han_jax.core.aggregate import aggregate
from han_jax.core.batch import Inputs, Targets
from han_jax.core.precision import make_loss_scale
from han_jax.model import MultiResolutionHAN
from han_jax.objective import forward_statistics, metrics_from_statistics, scored_tasks, temporal_regularization
from han_jax.training.compilation_cache import persistent
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec

Array = jax.Array

# StepConfig.rng_impl's values: jax.random.key's implementations.
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
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
      loss_scale: :class:`~han_jax.core.precision.NoOpLossScale` or dynamic (f16).
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


def make_model(spec: StepSpec) -> MultiResolutionHAN:
    return MultiResolutionHAN(config=spec.model, policy=spec.policy)


def make_optimizer(spec: StepSpec, learning_rate: float = 0.0) -> optax.GradientTransformation:
    """The whole update as one optax transformation over ``{"model", "log_vars"}``.

    ``learning_rate`` is the rate its state starts with; :func:`start_epoch` and
    :func:`train_step` write the schedule's from then on.

    From the outside in:
      * ``apply_if_finite``: a micro-batch with a non-finite gradient leaves everything
        inside untouched (it is never applied, however many come in a row);
        ``last_finite`` and ``total_notfinite`` record it.
      * ``MultiSteps``: ``accumulation_steps`` micro-batches per update.
      * ``inject_hyperparams``: the learning rate lives in the state, a run-time value:
        :func:`start_epoch` writes the epoch's (``"epoch"`` unit, the original's per-epoch
        ``scheduler.step()``), :func:`train_step` the update's (``"step"`` unit).
      * per group (``multi_transform``): the model's gradients are clipped to
        ``max_grad_norm`` (the original clipped model parameters only), then AdamW; the
        log-variances get their own AdamW scaled by ``log_var_lr_multiplier`` (AdamW's
        update is linear in the learning rate, so this is AdamW at the multiplied rate).

    It is given each group as one flat vector (:func:`optimizer_view`), not the parameter
    tree: the same maths (the global norm and AdamW are elementwise or whole-vector, and
    the finite check and accumulation are elementwise), in a handful of ops instead of
    several per parameter leaf, which compiles several times faster
    (``benchmarks/bench_update_compile.py``).
    """
    rule = spec.update

    def groups(learning_rate):
        def adamw():
            return optax.adamw(learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=rule.weight_decay)

        return optax.multi_transform(
            {
                # flatten: multi_transform hands each group the whole dict with the other
                # group masked; flattening keeps the moments one vector (as checkpoints hold them).
                "model": optax.flatten(optax.chain(optax.clip_by_global_norm(rule.max_grad_norm), adamw())),
                "log_vars": optax.flatten(optax.chain(adamw(), optax.scale(rule.log_var_lr_multiplier))),
            },
            {"model": "model", "log_vars": "log_vars"},
        )

    tx = optax.inject_hyperparams(groups)(learning_rate=learning_rate)
    tx = optax.MultiSteps(tx, every_k_schedule=rule.accumulation_steps)
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
    with run-time offsets the leaves of one shape share one (53 shapes), which cuts the
    update's compile several times (``benchmarks/bench_update_compile.py``). Other backends
    keep static slices: a conditional there can cost a device-to-host sync of its
    predicate. The values are the same either way.

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


def _inject_state(opt_state):
    """``inject_hyperparams``' state inside :func:`make_optimizer`'s (apply_if_finite -> MultiSteps -> inject)."""
    return opt_state.inner_state.inner_opt_state


def current_learning_rate(opt_state) -> Array:
    """The learning rate in the optimiser state (the last update's in ``"step"`` mode)."""
    return _inject_state(opt_state).hyperparams["learning_rate"]


def _with_learning_rate(opt_state, learning_rate):
    multi = opt_state.inner_state
    inject = multi.inner_opt_state
    hyperparams = {**inject.hyperparams, "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
    multi = multi._replace(inner_opt_state=inject._replace(hyperparams=hyperparams))
    return opt_state._replace(inner_state=multi)


@functools.lru_cache(maxsize=16)
def _init_fn(model_config, policy, rng_impl: str):
    """The jitted ``model.init``, one per architecture (its compile is the slow part)."""
    model = MultiResolutionHAN(config=model_config, policy=policy)
    return persistent(jax.jit(lambda raw, x: model.init({"params": typed_key(raw, rng_impl)}, x, deterministic=True)),
                      "model_init", (model_config, policy, rng_impl))


@functools.lru_cache(maxsize=16)
def _optimizer_init_fn(spec: StepSpec):
    """``make_optimizer(spec).init``: stored with the steps when the compilation cache is on.

    Eager otherwise: run eagerly it dispatches one small op per parameter leaf, but those ops
    are shared by every specification of a process, where a jitted init would compile once
    per specification.
    """
    init = make_optimizer(spec).init
    return persistent(jax.jit(init), "optimizer_init", spec.update, without_store=init)


def init_optimizer(spec: StepSpec, params, log_vars: dict, schedule: Optional[Schedule] = None):
    """:func:`make_optimizer`'s initial state for these parameters, over :func:`optimizer_view`'s flat groups.

    Its learning rate is ``schedule``'s first (0 without one) until :func:`start_epoch` (or, per
    update, :func:`train_step`) writes the schedule's.
    """
    opt_state = _optimizer_init_fn(spec)(optimizer_view({"model": params, "log_vars": log_vars}))
    return opt_state if schedule is None else _with_learning_rate(opt_state, schedule(0))


def create_train_state(rng: Array, spec: StepSpec, inputs: Inputs, schedule: Optional[Schedule] = None, *,
                       log_var_priors=None) -> TrainState:
    """Initialises parameters (from one sample batch's shapes), log-variances and optimiser.

    Args:
      rng: the run's key (``TrainConfig.seed``).
      spec: the steps' specification.
      inputs: any batch of the run's shapes.
      schedule: the run's learning-rate curve: the state starts at its first rate (as
        ``Steps.start_epoch(state, 0)`` would set it); without one, at 0.
      log_var_priors: ``StepConfig.log_var_priors``: None for each task's own prior, or one value for all.
    """
    init_rng, _ = jax.random.split(rng)
    params = _init_fn(spec.model, spec.policy, spec.rng_impl)(init_rng, inputs)["params"]
    return state_with_parameters(rng, spec, params, spec.objective.init_log_vars(log_var_priors), schedule)


def state_with_parameters(rng: Array, spec: StepSpec, params, log_vars: Mapping[str, Array],
                          schedule: Optional[Schedule] = None) -> TrainState:
    """A train state at step 0 around given parameters and log-variances (fresh optimiser and loss scale).

    ``rng`` is the run's key, split as :func:`create_train_state` splits it: a state built
    here from converted parameters draws the dropout masks a state initialised with the
    same seed would.
    """
    _, state_rng = jax.random.split(rng)
    return TrainState(
        step=jnp.int32(0),
        params=params,
        log_vars=dict(log_vars),
        opt_state=init_optimizer(spec, params, log_vars, schedule),
        loss_scale=make_loss_scale(spec.policy),
        rng=state_rng,
    )


def start_epoch(state: TrainState, epoch: Array, schedule: Schedule, *, spec: StepSpec) -> TrainState:
    """The original's per-epoch ``scheduler.step()`` and ``zero_grad()``.

    Writes the epoch's learning rate into the optimiser state (``"epoch"`` unit) and drops
    a partial gradient accumulation.
    """
    opt_state = state.opt_state
    if spec.update.schedule_unit == "epoch":
        opt_state = _with_learning_rate(opt_state, schedule(epoch))
    multi = opt_state.inner_state  # apply_if_finite -> MultiSteps
    multi = multi._replace(mini_step=jnp.zeros_like(multi.mini_step),
                           acc_grads=jax.tree_util.tree_map(jnp.zeros_like, multi.acc_grads))
    return state.replace(opt_state=opt_state._replace(inner_state=multi))


# ---------------------------------------------------------------------------
# The shared path.
# ---------------------------------------------------------------------------


def shared_path(params, log_vars, inputs: Inputs, targets: Targets, rng, *, spec: StepSpec, deterministic: bool,
                axis_name: Optional[str]):
    """Model -> one statistics pass -> aggregate: the one path of every phase.

    Returns:
      (total, outputs, statistics): the batch's Kendall total (the objective, with
      gradient), the model outputs and the batch's statistics (every lane, no gradient).
    """
    rngs = None if deterministic else {"dropout": rng}
    outputs = make_model(spec).apply({"params": params}, inputs, deterministic=deterministic, rngs=rngs)
    objective = spec.objective
    losses, statistics = forward_statistics(outputs, targets, tasks=objective.tasks, loss=objective.loss,
                                            axis_name=axis_name)
    total, _ = aggregate(losses, log_vars, objective.aggregate, task_names=objective.weighted)
    return total, outputs, statistics


def _source_dropout(inputs: Inputs, rng, spec: StepSpec) -> Inputs:
    """Phase-2 SourceDropout: one draw per batch zeroes each listed monthly source."""
    reg = spec.regularization
    feats, masks = dict(inputs.monthly_features), dict(inputs.monthly_masks)
    for i, name in enumerate(reg.source_dropout_sources):
        if name not in feats:
            raise ValueError(f"source dropout: monthly source {name!r} is not in the batch; it has {sorted(feats)}")
        drop = jax.random.bernoulli(jax.random.fold_in(rng, i), reg.source_dropout_prob)
        feats[name] = jnp.where(drop, jnp.zeros_like(feats[name]), feats[name])
        masks[name] = jnp.where(drop, jnp.zeros_like(masks[name]), masks[name])
    return inputs.replace(monthly_features=feats, monthly_masks=masks)


def train_step(state: TrainState, inputs: Inputs, targets: Targets, schedule: Schedule, *, spec: StepSpec,
               axis_name: Optional[str] = None, deterministic: bool = False):
    """One micro-batch: gradients of the shared objective, handed to optax.

    Args:
      state: the train state.
      inputs, targets: one batch (padding rows have ``sample_mask`` False).
      schedule: the learning-rate curve (read per update in ``"step"`` mode).
      spec: the steps' specification (static).
      axis_name: the pmap axis, or None.
      deterministic: switch dropout off (used to prove the shared path).

    Returns:
      (new state, :class:`StepOutput`): its metrics are the shared keys plus ``objective``,
      ``temporal_reg``, ``learning_rate``, ``skipped_step``, ``grad_norm`` and
      ``loss_scale``; its statistics are the batch's (dropout on), as :func:`eval_step`'s.
    """
    rng, dropout_rng, source_rng = jax.random.split(state.rng, 3)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    dropout_rng = typed_key(dropout_rng, spec.rng_impl)
    reg, rule = spec.regularization, spec.update
    if reg.source_dropout and not deterministic:
        inputs = _source_dropout(inputs, source_rng, spec)

    def objective_fn(trainable):
        total, outputs, statistics = shared_path(trainable["model"], trainable["log_vars"], inputs, targets,
                                                 dropout_rng, spec=spec, deterministic=deterministic,
                                                 axis_name=axis_name)
        if reg.temporal_reg:
            temporal, _ = temporal_regularization(
                outputs, targets.sample_mask.astype(bool), correlation_weight=reg.temporal_corr_weight,
                smoothness_weight=reg.temporal_smooth_weight, axis_name=axis_name)
        else:
            temporal = jnp.float32(0.0)
        objective = total + temporal
        # The original's guard: a huge objective is rescaled to 1000 by a detached
        # factor, so the gradient keeps its direction but not its size.
        guarded = jnp.where(objective > rule.loss_guard_threshold,
                            objective * (rule.loss_guard_target / jax.lax.stop_gradient(objective)), objective)
        return state.loss_scale.scale(guarded), (statistics, temporal, objective)

    trainable = {"model": state.params, "log_vars": state.log_vars}
    grads, (statistics, temporal, objective) = jax.grad(objective_fn, has_aux=True)(trainable)
    metrics = metrics_from_statistics(statistics, state.log_vars, spec.objective)
    # From here on each group is one vector (optimizer_view): one pmean, one finite
    # check and one update per group instead of one per parameter leaf.
    grads = state.loss_scale.unscale(optimizer_view(grads))
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    opt_state = state.opt_state
    if rule.schedule_unit == "step":
        opt_state = _with_learning_rate(opt_state, schedule(_inject_state(opt_state).count))
    flat = optimizer_view(trainable)
    updates, opt_state = make_optimizer(spec).update(grads, opt_state, flat)
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
        temporal_reg=temporal,
        objective=objective,
        learning_rate=current_learning_rate(opt_state),
        skipped_step=(~finite).astype(jnp.float32),
        grad_norm=jnp.where(finite, optax.tree.norm(grads["model"]), 0.0),
        loss_scale=jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
    )
    return new_state, StepOutput(metrics=metrics, statistics=statistics, predictions={})


@flax.struct.dataclass
class StepOutput:
    """What every step returns (``train_step`` with the new state before it).

    Attributes:
      metrics: the batch's own numbers; every step has the same keys, ``train_step`` adds
        the optimiser's extras.
      statistics: the batch's statistics, sums with their counts:
        :mod:`han_jax.training.accumulate` merges them into the exact metrics of a whole split.
      predictions: per-row predictions (``test_step``; empty otherwise).
    """

    metrics: dict
    statistics: dict
    predictions: dict


def eval_step(state: TrainState, inputs: Inputs, targets: Targets, *, spec: StepSpec,
              axis_name: Optional[str] = None) -> StepOutput:
    """Validation: the shared path with dropout off."""
    _, _, statistics = shared_path(state.params, state.log_vars, inputs, targets, None, spec=spec,
                                   deterministic=True, axis_name=axis_name)
    return StepOutput(metrics=metrics_from_statistics(statistics, state.log_vars, spec.objective),
                      statistics=statistics, predictions={})


def row_predictions(outputs: dict, spec: StepSpec) -> dict:
    """Per-row predictions of the anchor (the window's last month): every task's :meth:`~han_jax.tasks.Task.predict`.

    The tasks read the heads as their losses and metrics do (``han_jax/tasks``): regime
    probabilities, the transition probability, the ZINB parameters and expected
    fatalities, the anomaly score, the next month of the monthly features (normalised) and,
    with the direct daily head, its days t+1..t+H.
    """
    objective = spec.objective
    predictions = {}
    for task in scored_tasks(objective.tasks, outputs):
        predictions.update(task.predict(outputs, objective.model, objective.loss))
    return predictions


def test_step(state: TrainState, inputs: Inputs, targets: Targets, *, spec: StepSpec,
              axis_name: Optional[str] = None) -> StepOutput:
    """Test: :func:`eval_step` plus per-row predictions for reports (:func:`row_predictions` and ``sample_mask``)."""
    _, outputs, statistics = shared_path(state.params, state.log_vars, inputs, targets, None, spec=spec,
                                         deterministic=True, axis_name=axis_name)
    predictions = dict(row_predictions(outputs, spec), sample_mask=targets.sample_mask)
    return StepOutput(metrics=metrics_from_statistics(statistics, state.log_vars, spec.objective),
                      statistics=statistics, predictions=predictions)



@functools.lru_cache(maxsize=16)
def jit_forward(spec: StepSpec):
    """``forward(params, inputs) -> outputs``: the model, deterministic (dropout off), jitted once per architecture."""
    model = make_model(spec)
    return persistent(jax.jit(lambda params, inputs: model.apply({"params": params}, inputs, deterministic=True)),
                      "forward", (spec.model, spec.policy))
