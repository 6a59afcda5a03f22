"""The learning-rate curve as run-time values: optax's warmup-cosine, the original's effective warmup."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_jax import config as configs
from han_jax.training.schedule import Schedule


@jax.jit
def _evaluate(schedule, counts):
    return jax.vmap(schedule)(counts)


def _optax(optim, epochs, steps_per_epoch=1):
    """The original's curve, from optax: a warmup of min(warmup, epochs - 1) epochs, a cosine to ``epochs``."""
    warmup = max(0, min(optim.warmup_epochs, epochs - 1)) * steps_per_epoch
    return optax.warmup_cosine_decay_schedule(
        init_value=optim.learning_rate * optim.warmup_start_factor, peak_value=optim.learning_rate,
        warmup_steps=warmup, decay_steps=epochs * steps_per_epoch, end_value=optim.min_lr)


@settings(max_examples=40, deadline=None)
@given(epochs=st.integers(2, 300), warmup=st.integers(0, 30), lr=st.floats(1e-6, 1e-1),
       start=st.sampled_from([0.0, 0.01, 0.5, 1.0]), min_lr_fraction=st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
def test_it_is_optax_s_warmup_cosine_to_float_rounding(epochs, warmup, lr, start, min_lr_fraction):
    optim = configs.OptimConfig(learning_rate=lr, warmup_epochs=warmup, warmup_start_factor=start,
                                min_lr=lr * min_lr_fraction)
    schedule, original = Schedule.of(optim, epochs=epochs), _optax(optim, epochs)
    counts = jnp.arange(303, dtype=jnp.int32)  # past the end too: it stays at min_lr; one shape, one compile
    ours = _evaluate(schedule, counts)
    # Float rounding, relative to the peak: the cosine's end subtracts nearly equal numbers.
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.vmap(original)(counts)), rtol=0, atol=1e-6 * lr)


def test_the_original_s_values():
    schedule = Schedule.of(configs.OptimConfig(), epochs=200)  # lr 1e-4, warmup 10 epochs of 200, min 1e-6
    np.testing.assert_allclose(float(schedule(0)), 1e-6, rtol=1e-5)  # lr * 0.01
    np.testing.assert_allclose(float(schedule(5)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(10)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(105)), 1e-6 + (1e-4 - 1e-6) * 0.5, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(200)), 1e-6, rtol=1e-4)
    short = Schedule.of(configs.OptimConfig(), epochs=3)  # effective warmup min(10, 3 - 1) = 2
    np.testing.assert_allclose(float(short(1)), 1e-6 + 0.5 * (1e-4 - 1e-6), rtol=1e-5)


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_a_one_epoch_schedule_starts_at_the_learning_rate(unit):
    optim = dataclasses.replace(configs.small().step.optim, schedule_unit=unit)
    schedule = Schedule.of(optim, epochs=1, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(optim.learning_rate)
    rates = [float(schedule(s)) for s in range(6)]  # float32: compare within rounding
    assert all(optim.min_lr * (1 - 1e-6) <= r <= optim.learning_rate * (1 + 1e-6) for r in rates), rates


def test_step_mode_stretches_the_curve_over_updates():
    optim = dataclasses.replace(configs.OptimConfig(), schedule_unit="step")
    by_update, by_epoch = Schedule.of(optim, epochs=20, steps_per_epoch=7), Schedule.of(optim, epochs=20)
    lr = optim.learning_rate
    for epoch in (0, 3, 10, 19):
        np.testing.assert_allclose(float(by_update(7 * epoch)), float(by_epoch(epoch)), rtol=0, atol=1e-6 * lr)
    np.testing.assert_allclose(float(by_update(7 * 4 + 3)), float(_optax(optim, 20, 7)(7 * 4 + 3)), rtol=0,
                               atol=1e-6 * lr)
    with pytest.raises(ValueError, match="schedule_unit"):
        Schedule.of(dataclasses.replace(optim, schedule_unit="batch"), epochs=3)
