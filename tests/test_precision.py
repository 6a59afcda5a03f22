"""Policy parsing; dynamic loss scaling."""

import jax.numpy as jnp
import numpy as np
import pytest

from han_jax.core.precision import DynamicLossScale, NoOpLossScale, Policy, make_loss_scale


def test_presets_and_strings():
    assert Policy.from_string("bf16") == Policy(jnp.float32, jnp.bfloat16, jnp.float32)
    assert Policy.from_string("f32") == Policy()
    p = Policy.from_string("params=float32, compute=float16, output=float32")
    assert p.compute_dtype == jnp.float16 and p.needs_loss_scaling
    assert Policy.from_string("bf16").name == "bf16"
    assert hash(Policy.from_string("bf16")) == hash(Policy(jnp.float32, "bfloat16", "float32"))


@pytest.mark.parametrize("spec,field", [("params=float32,compute=int8", "compute"),
                                        ("params=float32,comput=f32", "comput"),
                                        ("bf17", "bf17")])
def test_bad_policy_names_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        Policy.from_string(spec)


def test_dynamic_loss_scale_shrinks_on_overflow_and_grows_after_period():
    s = DynamicLossScale(loss_scale=jnp.float32(8.0), period=3)
    grads = {"a": jnp.array([1.0, 2.0])}
    np.testing.assert_allclose(np.asarray(s.unscale(s.scale(grads))["a"]), [1.0, 2.0])
    s = s.adjust(jnp.array(False))
    assert float(s.loss_scale) == 4.0 and int(s.counter) == 0
    for _ in range(2):
        s = s.adjust(jnp.array(True))
    assert float(s.loss_scale) == 4.0 and int(s.counter) == 2
    s = s.adjust(jnp.array(True))
    assert float(s.loss_scale) == 8.0 and int(s.counter) == 0
    tiny = DynamicLossScale(loss_scale=jnp.float32(1.0))
    assert float(tiny.adjust(jnp.array(False)).loss_scale) == 1.0  # floor at min_loss_scale


def test_make_loss_scale_by_policy():
    assert isinstance(make_loss_scale(Policy.from_string("bf16")), NoOpLossScale)
    assert isinstance(make_loss_scale(Policy.from_string("f16")), DynamicLossScale)
