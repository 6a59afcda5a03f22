"""Run the same-shaped parts of several per-source modules as one vmapped computation.

The original builds one encoder per source, and han-jax keeps its parameter tree
(``daily_encoders_personnel/layers_0/...``) so that checkpoints and the mapping to
the original stay one-to-one. A Python loop over sources inside jit, though, puts
S copies of every op in the graph (S times the compile time, S small matmuls
where one batched matmul would do). So a per-source module declares the
parameters of its same-shaped sub-stack with :func:`declare_params` (the very tree a
child module of that name would create), hands them to its parent, and the parent
stacks them along a new leading source axis and runs the sub-stack once under
``jax.vmap`` (:func:`stack_trees`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def declare_params(parent: nn.Module, name: str, template: nn.Module, *example_args, **example_kwargs) -> Any:
    """Declare ``template``'s parameters as ``parent``'s param ``name``; return them.

    ``template`` is an unbound module; its parameters are created by
    ``template.init`` on the example arguments (only their shapes matter) with the
    key flax gives this param, and stored as the nested dict a child module named
    ``name`` would store. Apply them with ``template.apply({"params": p}, ...)``.
    """
    return parent.param(name, lambda key: template.init({"params": key}, *example_args, **example_kwargs)["params"])


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack same-structured pytrees leaf by leaf along a new axis 0."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)
