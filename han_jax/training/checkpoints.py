"""Train states on disk: orbax checkpoints of the ``latest`` and ``best`` epochs, and reading them back.

Crash safety is orbax's: a step is written into a temporary folder and renamed into place
when complete, the previous step is dropped (``max_to_keep=1``) only after that, and a
writing manager deletes temporary folders left by an interrupted save when it opens, so
``latest_step`` is always a complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from han_jax.config import ModelConfig
from han_jax.core.batch import Inputs
from han_jax.training.spec import StepSpec
from han_jax.training.steps import TrainState, create_train_state, with_flat_accumulator, with_tree_accumulator

CHECKPOINTS = ("best", "latest")
CHECKPOINTS_DIR = "checkpoints"


def _accumulator_is_trees(metadata) -> bool:
    """Whether a checkpoint's tree metadata holds ``MultiSteps``' accumulated gradients as parameter trees.

    han-jax wrote them so before :func:`~han_jax.training.steps.optimizer_view` (one flat
    vector per group since); the metadata says which before any array is read.
    """
    try:
        acc = metadata["state"]["opt_state"]["inner_state"]["acc_grads"]
    except (KeyError, TypeError):
        return False
    return isinstance(acc, dict) and isinstance(acc.get("model"), dict)


class Checkpoints:
    """Latest and best train states with orbax, plus the loop's JSON metadata.

    The loop saves ``latest`` before ``best``, so ``best`` can only lag ``latest`` by the
    epoch being saved: :meth:`resume` repairs that case.

    In a multi-process run every process calls every method: orbax saves the replicated
    global state collectively (each array once) and every process restores its own copy.
    ``place`` turns a restored (local) state into what :meth:`save` is given in this layout
    (:mod:`han_jax.training.devices`), for :meth:`resume`'s save of it.
    """

    def __init__(self, run_dir: str, create: bool = True, place: Callable = lambda state: state):
        self._place = place
        # Synchronous saves: the loop waits for each save anyway (exact resume needs it on disk).
        # Read-only managers get the values orbax would otherwise reset (with a warning each).
        opts = ocp.CheckpointManagerOptions(max_to_keep=1 if create else None, create=create,
                                            save_interval_steps=1 if create else 0,
                                            enable_async_checkpointing=False, read_only=not create,
                                            cleanup_tmp_directories=create)
        root = os.path.abspath(os.path.join(run_dir, CHECKPOINTS_DIR))

        # The handlers named up front, so a fresh manager can read a checkpoint's tree metadata (restore).
        def manager(folder):
            return ocp.CheckpointManager(folder, options=opts, item_handlers={
                "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

        self.latest = manager(os.path.join(root, "latest"))
        self.best = manager(os.path.join(root, "best"))

    def save(self, manager, epoch: int, state: TrainState, meta: dict) -> None:
        saved = manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
        if not saved:  # orbax skips, silently, a step at or below the newest one on disk
            raise RuntimeError(f"{manager.directory}: epoch {epoch} not saved; it holds epoch {manager.latest_step()}")

    def restore(self, manager, template: TrainState):
        """``(state, meta)`` of the manager's newest step in ``template``'s structure; ``(None, None)`` if none."""
        step = manager.latest_step()
        if step is None:
            return None, None
        # Each process restores its own whole copy onto its first device, whatever layout saved it (one
        # device, a mesh, several processes): without a sharding orbax would ask for the saving topology.
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def restore(template):
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                                              template)
            return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))

        try:
            if _accumulator_is_trees(manager.metadata(step).item_metadata):
                # A checkpoint from before the optimiser saw flat group vectors (steps.optimizer_view):
                # read it in its own layout, then convert it (lossless).
                out = restore(jax.eval_shape(with_tree_accumulator, template))
                convert = with_flat_accumulator
            else:
                out = restore(template)
                convert = None
        except Exception as e:  # orbax, tensorstore and JSON errors of a damaged or foreign checkpoint alike
            folder = os.path.join(str(manager.directory), str(step))
            which = os.path.basename(str(manager.directory))
            other = {"best": "latest", "latest": "best"}.get(which)
            detail = " ".join(str(e).split())[:160]
            raise CheckpointDamaged(
                f"{folder}: the checkpoint cannot be read ({type(e).__name__}: {detail}); it is damaged or was "
                f"written for another model" + (f" (the {other} checkpoint may be intact: --checkpoint {other})"
                                                 if other else "")) from e
        # orbax hands back device-committed arrays; a fresh state is uncommitted, and jit
        # keys its cache on that, so a resumed run would recompile every step. Hand back
        # uncommitted arrays, exactly as create_train_state does.
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), out.state)
        return (state if convert is None else convert(state)), out.meta

    def resume(self, template: TrainState, log=print):
        """The ``latest`` state and metadata, with ``best`` brought up to date first.

        A run killed between saving an improved epoch's ``latest`` and its ``best`` resumes
        after that epoch, yet ``best`` holds an older one: the final scoring would then read
        another state than ``best_epoch`` names. That epoch's state is the restored one, so
        it is saved as ``best`` again.
        """
        state, meta = self.restore(self.latest, template)
        if state is not None and meta["best_epoch"] == meta["epoch"] and self.best.latest_step() != meta["epoch"]:
            log(f"checkpoints/best: completing epoch {meta['epoch']}'s save, interrupted before")
            self.save(self.best, meta["epoch"], self._place(state), meta)
        return state, meta

    def close(self):
        self.latest.close()
        self.best.close()


class CheckpointDamaged(ValueError):
    """A checkpoint on disk that cannot be restored into the run's state: one line naming its folder."""


def zero_inputs(model: ModelConfig, daily_len: int, monthly_len: int, batch_size: int = 1) -> Inputs:
    """An all-unobserved batch of the model's source layout (only its shapes matter, e.g. to build a state)."""
    def block(layout, length):
        return ({n: np.zeros((batch_size, length, f), np.float32) for n, f in layout},
                {n: np.zeros((batch_size, length, f), bool) for n, f in layout})

    df, dm = block(model.daily_sources, daily_len)
    mf, mm = block(model.monthly_sources, monthly_len)
    return Inputs(daily_features=df, daily_masks=dm, monthly_features=mf, monthly_masks=mm,
                  month_boundaries=np.zeros((batch_size, monthly_len, 2), np.int32))


def abstract_state(spec: StepSpec, daily_len: int, monthly_len: int):
    """The shapes and dtypes of the spec's train state, without computing (or compiling) an initialisation."""
    return jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), spec,
                                                     zero_inputs(spec.model, daily_len, monthly_len)))


def load_checkpoint(run_dir: str, which: str, spec: StepSpec, daily_len: int, monthly_len: int) -> TrainState:
    """The ``best`` or ``latest`` train state of a run folder, restored into the spec's structure.

    Raises:
      ValueError: ``which`` is neither.
      FileNotFoundError: no complete checkpoint of that kind.
    """
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint {which!r}: expected one of {CHECKPOINTS}")
    ckpt = Checkpoints(run_dir, create=False)
    try:
        state, _ = ckpt.restore(getattr(ckpt, which), abstract_state(spec, daily_len, monthly_len))
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"{os.path.join(run_dir, CHECKPOINTS_DIR, which)}: no checkpoint")
    return state


def checkpoint_epoch(run_dir: str, which: str = "latest") -> Optional[int]:
    """The epoch of the folder's complete ``latest`` (or ``best``) checkpoint; None if there is none.

    A save interrupted before orbax committed it does not count: ``--resume`` starts after this epoch.
    """
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS_DIR, which)):
        return None
    ckpt = Checkpoints(run_dir, create=False)
    try:
        return getattr(ckpt, which).latest_step()
    finally:
        ckpt.close()
