"""han-jax: a JAX/Flax multi-task, multi-resolution Hierarchical Attention Network.

Every phase runs one statistics pass over the tasks (``han_jax.objective.forward_statistics``,
whose per-task losses are ``compute_losses``), one shared ``aggregate`` and one metric
finalisation: ``train_step``, ``eval_step`` and ``test_step`` all go through it under one
precision policy.
"""

import importlib

# Before anything starts JAX's threads: their heap decides whether a step's buffers are kept between steps.
from han_jax.core import allocator

allocator.configure()

# The public names load on first use, so that importing the package (as the ``han-jax`` command's launcher
# does, han_jax.launch) does not import JAX.
_EXPORTS = {"AggregateConfig": "han_jax.config", "LossConfig": "han_jax.config", "ModelConfig": "han_jax.config",
            "Inputs": "han_jax.core.batch", "Targets": "han_jax.core.batch", "Policy": "han_jax.core.precision"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'han_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
