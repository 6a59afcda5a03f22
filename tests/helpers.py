"""The configuration the CLI tests run, shared so compiled steps are shared across test files."""

import dataclasses
import functools

from han_jax import config as configs

TINY_EPOCHS = 3


def tiny_config() -> configs.Config:
    """``han-jax train --preset tiny --epochs 3``: the configuration the CLI tests run."""
    config = configs.tiny()
    return config.replace(train=dataclasses.replace(config.train, epochs=TINY_EPOCHS))


@functools.lru_cache(maxsize=1)
def tiny_run_config() -> configs.Config:
    """:func:`tiny_config` as ``train`` resolves it (model layout from the data): what its steps compile for."""
    from han_jax.runs import prepare

    return prepare(tiny_config())[1]
