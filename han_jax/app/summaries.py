"""TensorBoard event files with the scalars of ``metrics.jsonl`` (optional: tensorboardX).

One tag per metric and phase (``val/regime_balanced_accuracy``, ``train/loss/regime``),
step = epoch, so TensorBoard shows exactly the numbers of ``metrics.jsonl``. Without
tensorboardX (``pip install "han-jax[tensorboard]"``) nothing is written and the run
says so once.
"""

from __future__ import annotations

import glob
import numbers
import os
from typing import Mapping, Optional

TENSORBOARD_DIR = "tensorboard"


def open_writer(run_dir: str, *, enabled: bool, purge_from_epoch: Optional[int] = None, log=print):
    """A tensorboardX ``SummaryWriter`` on ``run_dir/tensorboard``, or None (off, or tensorboardX absent).

    Args:
      run_dir: the run folder.
      enabled: ``TrainConfig.tensorboard``.
      purge_from_epoch: a resumed run's first epoch: TensorBoard hides the earlier
        files' events from this epoch on (they are redone). None: a fresh run, whose
        folder's old event files are removed, as its ``metrics.jsonl`` is.
      log: where the one line about a missing tensorboardX goes.
    """
    if not enabled:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log('tensorboard: no event files (tensorboardX is not installed; pip install "han-jax[tensorboard]")')
        return None
    log_dir = os.path.join(run_dir, TENSORBOARD_DIR)
    if purge_from_epoch is None:
        for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
            os.remove(path)
    return SummaryWriter(log_dir, purge_step=purge_from_epoch)


def write_scalars(writer, epoch: int, phase: str, metrics: Mapping) -> None:
    """Every number of ``metrics`` as ``<phase>/<key>`` at step ``epoch``.

    A list of numbers (per-class counts) gives one tag per element, ``<phase>/<key>/<i>``;
    None (a metric with no valid row) writes nothing.
    """
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                _add(writer, f"{phase}/{key}/{i}", v, epoch)
        else:
            _add(writer, f"{phase}/{key}", value, epoch)


def _add(writer, tag: str, value, step: int) -> None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        writer.add_scalar(tag, float(value), global_step=step)
