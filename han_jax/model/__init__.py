"""Flax port of the original MultiResolutionHAN (files follow the forward pass's stages)."""

from han_jax.model.han import MultiResolutionHAN

__all__ = ["MultiResolutionHAN"]
