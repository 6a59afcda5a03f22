"""han-jax: a JAX/Flax multi-task, multi-resolution Hierarchical Attention Network.

One pure ``compute_losses`` feeds one shared ``aggregate``; ``train_step``,
``eval_step`` and ``test_step`` all go through it under one precision policy.
"""

from han_jax.config import AggregateConfig, LossConfig, ModelConfig
from han_jax.core.batch import Inputs, Targets
from han_jax.core.precision import Policy

__all__ = ["Inputs", "Targets", "AggregateConfig", "LossConfig", "ModelConfig", "Policy"]
__version__ = "0.1.0"
