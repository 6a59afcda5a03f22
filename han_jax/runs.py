"""Run folders: the configuration resolved against its data, and the checkpoints a run keeps.

``prepare`` turns a configuration into the one the steps run with (the model's
source layout from the data); :class:`Checkpoints` saves and restores the
``latest`` and ``best`` train states with orbax; :func:`load_checkpoint`
restores one of them for scoring.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.config import Config
from han_jax.data import Datasets, build_datasets, iterate_batches, make_world, num_batches
from han_jax.steps import TrainState, create_train_state


def prepare(config: Config, log=None) -> tuple[Datasets, Config]:
    """Builds the datasets and the configuration the steps run with.

    The model's source layout comes from the data, and the optimiser's updates
    per epoch from the training split and the batch size.
    """
    datasets = build_datasets(make_world(config.data), config.data)
    if log is not None:
        for line in datasets.report:
            log(f"data: {line}")
    model = dataclasses.replace(config.model, **datasets.model_layout())
    n_train_batches = num_batches(datasets.train, config.train.batch_size)
    optim = config.step.optim
    optim = dataclasses.replace(optim, steps_per_epoch=max(1, n_train_batches // optim.accumulation_steps))
    config = config.replace(model=model, step=dataclasses.replace(config.step, optim=optim))
    if log is not None:
        log(f"data: train/val/test anchors {len(datasets.train)}/{len(datasets.val)}/{len(datasets.test)}; "
            f"daily {model.daily_sources}; monthly {model.monthly_sources}")
    return datasets, config


class Checkpoints:
    """Latest and best train states with orbax, plus the loop's JSON metadata."""

    def __init__(self, run_dir: str, create: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # Synchronous saves: the loop waits for each save anyway (exact resume needs it on disk).
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False,
                                            read_only=not create)
        root = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=opts)
        self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=opts)

    def save(self, manager, epoch: int, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def restore(self, manager, template: TrainState):
        ocp = self._ocp
        step = manager.latest_step()
        if step is None:
            return None, None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
        # orbax hands back device-committed arrays; a fresh state is uncommitted, and jit
        # keys its cache on that, so a resumed run would recompile every step. Hand back
        # uncommitted arrays, exactly as create_train_state does.
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), out.state)
        return state, out.meta

    def close(self):
        self.latest.close()
        self.best.close()


def replicate(tree, n):
    """One copy per device, laid out as pmap's own outputs are.

    Broadcasting alone leaves the copies on one device; pmap would then see its
    sharded output as a new kind of input on the second step and compile again.
    """
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)
    return jax.pmap(lambda x: x)(stacked)


def load_checkpoint(run_dir: str, which: str, config: Config, datasets: Datasets) -> TrainState:
    """The ``best`` or ``latest`` train state of a run folder, restored into ``config``'s structure."""
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint {which!r}: expected 'best' or 'latest'")
    sample_inputs, _ = next(iterate_batches(datasets.train, config.train.batch_size))
    template = create_train_state(jax.random.PRNGKey(config.train.seed), config, sample_inputs)
    ckpt = Checkpoints(run_dir, create=False)
    try:
        state, _ = ckpt.restore(getattr(ckpt, which), template)
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"{os.path.join(run_dir, 'checkpoints', which)}: no checkpoint")
    return state


def unreplicate(tree):
    """The first device's copy of a replicated pytree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


