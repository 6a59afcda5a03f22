"""han-jax: a JAX/Flax multi-task, multi-resolution Hierarchical Attention Network.

Every phase runs one statistics pass over the tasks (``han_jax.objective.forward_statistics``,
whose per-task losses are ``compute_losses``), one shared ``aggregate`` and one metric
finalisation: ``train_step``, ``eval_step`` and ``test_step`` all go through it under one
precision policy.
"""

from han_jax.config import AggregateConfig, LossConfig, ModelConfig
from han_jax.core.batch import Inputs, Targets
from han_jax.core.precision import Policy

__all__ = ["Inputs", "Targets", "AggregateConfig", "LossConfig", "ModelConfig", "Policy"]
__version__ = "0.1.0"
