"""What a compiled step is made of: the static argument of every step and the key of its compiled executable.

A step's program depends on the model (its architecture and source layout), on how the
step computes (precision, the tasks and their losses, the aggregate, the shape of the
optimiser update, the train-only regularisers, the random number generator) and on the
batch's shapes and the device layout, which ``jit`` and :mod:`han_jax.training.devices`
key on themselves. It does not depend on the data's dates or files, on how long the loop
runs or what it reports, or on the learning-rate curve (a run-time
:class:`~han_jax.training.schedule.Schedule`): :class:`StepSpec` holds exactly the first
kind, so a new epoch count, patience, data folder or learning rate reuses the compiled
steps, in a process and in the persistent compilation cache.

Flax's ``wmt/train.py`` keeps only the model configuration static under ``jit`` in the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import Optional

from han_jax.config import Config, ConfigError, ModelConfig, OptimConfig, RegularizationConfig, Resolved
from han_jax.core.precision import Policy
from han_jax.objective import Objective
from han_jax.tasks import tasks as registered_tasks


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """The optimiser update's shape: the :class:`~han_jax.config.OptimConfig` fields that are not the schedule."""

    weight_decay: float
    max_grad_norm: float
    accumulation_steps: int
    log_var_lr_multiplier: float
    loss_guard_threshold: float
    loss_guard_target: float
    schedule_unit: str

    @classmethod
    def of(cls, optim: OptimConfig) -> "UpdateRule":
        return cls(**{f.name: getattr(optim, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that changes a step's program, and nothing else (see the module docstring).

    Attributes:
      objective: the tasks, the model configuration with the data's source layout, the
        loss and the aggregate options.
      policy: the precision policy of every phase.
      update: the optimiser update's shape.
      regularization: the train-only extras.
      rng_impl: the PRNG behind parameter initialisation and dropout.
    """

    objective: Objective
    policy: Policy = Policy()
    update: UpdateRule = UpdateRule.of(OptimConfig())
    regularization: RegularizationConfig = RegularizationConfig()
    rng_impl: str = "unsafe_rbg"

    @property
    def model(self) -> ModelConfig:
        return self.objective.model

    @property
    def task_code(self) -> tuple:
        """Each task's class, with a hash of its module's file when it lives outside han-jax.

        Part of the key of stored executables: :func:`~han_jax.training.compilation_cache.source_fingerprint`
        covers han-jax's own files, and a task's ``repr`` names neither its module nor its code.
        """
        code = []
        for task in self.objective.tasks:
            cls = type(task)
            digest = ""
            if not cls.__module__.startswith("han_jax."):
                with open(inspect.getfile(cls), "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            code.append((f"{cls.__module__}.{cls.__qualname__}", digest))
        return tuple(code)

    @classmethod
    def of(cls, config: Config, resolved: Optional[Resolved] = None, *, tasks: Optional[tuple] = None) -> "StepSpec":
        """The specification of ``config``'s steps on data ``resolved`` (default: the model's own layout).

        Args:
          config: the run's configuration.
          resolved: what the run derived from its data; its source layout becomes the model's.
          tasks: the tasks to score (default: the registry's, ``han_jax.tasks.tasks()``).

        Raises:
          ConfigError: no source layout (neither ``config.model`` nor ``resolved`` names one),
            or ``resolved`` records tasks the registry does not hold in that order (a run
            trained with a task of its own: register it before loading the run).
        """
        model = config.model if resolved is None else resolved.model(config.model)
        if model.daily_sources is None or model.monthly_sources is None:
            raise ConfigError("model.daily_sources/monthly_sources: expected a source layout (the preset leaves it "
                              "to the data: pass the Resolved of han_jax.app.runs.prepare)")
        tasks = registered_tasks() if tasks is None else tuple(tasks)
        names = tuple(task.name for task in tasks)
        if resolved is not None and resolved.tasks is not None and tuple(resolved.tasks) != names:
            raise ConfigError(f"tasks {list(resolved.tasks)}: the run's tasks; this process scores {list(names)} "
                              "(register the run's own tasks with han_jax.tasks.register before loading it)")
        step = config.step
        objective = Objective(tasks=tasks, model=model, loss=step.loss, aggregate=step.aggregate)
        return cls(objective=objective, policy=step.policy, update=UpdateRule.of(step.optim),
                   regularization=step.regularization, rng_impl=step.rng_impl)
