"""The tiny configuration the fast tier shares: one specification, one compiled set of steps per session.

Every test that needs the model runs it through :func:`tiny` (or the CLI run of
``tests/conftest.py``, which trains the same specification): the steps are compiled
once per process (``han_jax.training.devices`` caches them by specification and layout)
and every batch has the tiny data's shapes, so no test pays for a compile another test
already paid for.
"""

import dataclasses
import functools

import jax

from han_jax import config as configs
from han_jax.app.runs import prepare
from han_jax.testing import random_batch
from han_jax.training.devices import SingleDevice
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import create_train_state

TINY_EPOCHS = 3
# The tiny data's batch: 8 rows, 60 days, 3 months.
B, T, M = 8, 60, 3


def tiny_config() -> configs.Config:
    """``han-jax train --preset tiny --epochs 3``: the configuration the CLI tests run."""
    config = configs.tiny()
    return config.replace(train=dataclasses.replace(config.train, epochs=TINY_EPOCHS))


@dataclasses.dataclass(frozen=True)
class Tiny:
    """The tiny run's pieces: configuration, data, specification, steps, a batch and a fresh state."""

    config: configs.Config
    datasets: object
    resolved: configs.Resolved
    spec: StepSpec
    steps: object  # han_jax.training.devices.Steps on one device, the run's schedule bound
    batch: tuple  # random, with a padding row and alternating observation rates, the data's shapes
    state: object  # created from TINY_EPOCHS' seed, epoch 0 started

    @property
    def schedule(self) -> Schedule:
        return Schedule.of(self.config.step.optim, epochs=self.config.train.epochs,
                           steps_per_epoch=self.resolved.steps_per_epoch)


@functools.lru_cache(maxsize=1)
def tiny() -> Tiny:
    config = tiny_config()
    datasets, resolved = prepare(config)
    spec = StepSpec.of(config, resolved)
    steps = SingleDevice().steps(spec, Schedule.of(config.step.optim, epochs=config.train.epochs,
                                                   steps_per_epoch=resolved.steps_per_epoch))
    batch = random_batch(spec.model, b=B, t=T, m=M, seed=3, n_real=B - 1)
    state = steps.start_epoch(create_train_state(jax.random.PRNGKey(0), spec, batch[0]), 0)
    return Tiny(config, datasets, resolved, spec, steps, batch, state)


def fresh(state):
    """A copy of ``state``: the train step donates its state's buffers."""
    return jax.tree_util.tree_map(lambda x: x.copy(), state)
