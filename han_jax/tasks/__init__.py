"""The tasks of the multi-task head, one module each, and the registry every other layer iterates.

Each task module (``regime``, ``transition``, ``casualty``, ``anomaly``, ``forecast``,
``daily_forecast``) defines a :class:`~han_jax.tasks.base.Task`: the model outputs it reads,
its loss statistics and finalisation (the original's maths), its metrics, baselines and skill,
its prediction columns and plot panel, and its prior. The losses, metrics, baselines,
predictions, tables and the training loop iterate the registry (:func:`tasks`) or, inside
a step, the tuple of tasks its specification was built with; no other module names a task.
Adding a task is one new module and one :func:`register` call (``docs/adding_a_task.md``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from han_jax.tasks.anomaly import ANOMALY
from han_jax.tasks.base import TableContext, Task, loss_key, skill_score, targets_key
from han_jax.tasks.casualty import CASUALTY
from han_jax.tasks.daily_forecast import DAILY_FORECAST
from han_jax.tasks.forecast import FORECAST
from han_jax.tasks.regime import REGIME
from han_jax.tasks.transition import TRANSITION

__all__ = ["Task", "TableContext", "get", "loss_key", "names", "register", "skill_score", "targets_key", "tasks",
           "unregister", "using"]

# The original's tasks, in its order (the order of every report).
_REGISTRY: list = [REGIME, TRANSITION, CASUALTY, ANOMALY, FORECAST, DAILY_FORECAST]


def tasks() -> tuple:
    """The registered tasks, in order."""
    return tuple(_REGISTRY)


def names() -> tuple:
    """The registered tasks' names, in order."""
    return tuple(t.name for t in _REGISTRY)


def register(task: Task) -> None:
    """Adds a task after the registered ones; every specification built from then on includes it.

    Raises:
      ValueError: a task of that name is registered already.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register: expected a han_jax.tasks.Task, got {type(task).__name__}")
    if task.name in names():
        raise ValueError(f"register: a task named {task.name!r} is registered already; tasks are {list(names())}")
    _REGISTRY.append(task)


def unregister(name: str) -> None:
    """Removes the task named ``name`` (a specification built before keeps it)."""
    _REGISTRY[:] = [t for t in _REGISTRY if t.name != name]


@contextlib.contextmanager
def using(*extra: Task) -> Iterator[tuple]:
    """The registry with ``extra`` tasks added for the block (e.g. a task under test), then as before."""
    for task in extra:
        register(task)
    try:
        yield tasks()
    finally:
        for task in extra:
            unregister(task.name)


def get(name: str) -> Task:
    """The registered task named ``name``."""
    for task in _REGISTRY:
        if task.name == name:
            return task
    raise KeyError(f"no task named {name!r}; tasks are {list(names())}")
