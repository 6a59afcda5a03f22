"""``ModelConfig.transition_head``: a transition logit of its own, not the anomaly head's score (off by default)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.app.runs import prepare
from han_jax.config import LossConfig
from han_jax.core.precision import Policy
from han_jax.model import MultiResolutionHAN
from han_jax.objective import output_keys
from han_jax.tasks.transition import TRANSITION
from han_jax.testing import random_batch
from tests.helpers import B, M, T, tiny_config


def _model():
    """The tiny model with the tiny data's source layout (no step is compiled here)."""
    config = tiny_config()
    _, resolved = prepare(config)
    return resolved.model(config.model)


def _shapes(model_config):
    inputs, _ = random_batch(model_config, b=B, t=T, m=M)
    model = MultiResolutionHAN(config=model_config, policy=Policy())
    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, deterministic=True), inputs)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, deterministic=True), variables, inputs)
    return variables["params"], outputs


def test_the_option_adds_one_head_and_leaves_the_original_model_alone():
    base = _model()
    params, outputs = _shapes(base)
    with_head, outputs_head = _shapes(dataclasses.replace(base, transition_head=True))
    assert "transition_head" not in params and "transition_logit" not in outputs
    assert "transition_head" in with_head
    assert outputs_head["transition_logit"].shape == outputs_head["anomaly_score"].shape == (B, M, 1)
    extra = sum(x.size for x in jax.tree_util.tree_leaves(with_head["transition_head"]))
    assert sum(x.size for x in jax.tree_util.tree_leaves(with_head)) == \
        sum(x.size for x in jax.tree_util.tree_leaves(params)) + extra
    # The objective hands the task the head's output only when the model has it.
    assert output_keys((TRANSITION,), outputs) == ("anomaly_score",)
    assert output_keys((TRANSITION,), outputs_head) == ("anomaly_score", "transition_logit")


def test_the_transition_loss_reads_its_own_head_when_there_is_one():
    rng = np.random.default_rng(0)
    _, targets = random_batch(_model(), b=B, t=T, m=M)
    anomaly = jnp.asarray(rng.normal(size=(B, M, 1)), jnp.float32)
    own = jnp.asarray(rng.normal(size=(B, M, 1)), jnp.float32)
    row = jnp.ones(B, bool)

    def loss(outputs):
        stats = TRANSITION.statistics(outputs, targets, row, LossConfig(), None)
        return float(TRANSITION.finalize(stats, LossConfig())[0])

    shared = loss({"anomaly_score": anomaly})
    assert loss({"anomaly_score": anomaly, "transition_logit": own}) == loss({"anomaly_score": 3 * anomaly + 1,
                                                                              "transition_logit": own})
    assert loss({"anomaly_score": own}) == loss({"anomaly_score": anomaly, "transition_logit": own}) != shared
    p = TRANSITION.predict({"anomaly_score": anomaly, "transition_logit": own}, None, None)["transition_prob"]
    np.testing.assert_allclose(p, jax.nn.sigmoid(own[:, -1, 0]), rtol=1e-6)
