"""Issue 6: one compilation per step across an epoch, the last partial batch included.

The batches of ``iterate_batches`` have a fixed shape (a short last batch is padded
and masked by ``sample_mask``), so a whole epoch through ``jit_steps(...).eval`` and
``.train`` must reuse one executable each; ``train`` donates the state.
"""

import jax
import numpy as np

from han_jax.data import build_datasets, iterate_batches, make_world
from han_jax.steps import create_train_state, jit_steps
from tests.helpers import tiny_config, tiny_run_config


def _batch_size_with_partial_last_batch(n: int) -> int:
    return next(bs for bs in range(8, 16) if n % bs)


def test_eval_and_train_compile_once_per_epoch():
    # The tiny CLI configuration, so the compiled steps are shared with the other tests.
    dcfg = tiny_config().data
    ds = build_datasets(make_world(dcfg), dcfg)
    cfg = tiny_run_config()
    steps = jit_steps(cfg)

    bs = _batch_size_with_partial_last_batch(len(ds.val))
    batches = list(iterate_batches(ds.val, bs))
    assert len(batches) >= 2
    assert 0 < int(np.sum(batches[-1][1].sample_mask)) < bs  # the padded last batch is covered
    state = create_train_state(jax.random.PRNGKey(0), cfg, batches[0][0])
    sizes = []
    for inputs, targets in batches:
        jax.block_until_ready(steps.eval(state, inputs, targets))
        sizes.append(steps.eval._cache_size())
    assert sizes == [sizes[0]] * len(sizes), sizes
    assert sizes[0] == 1

    bs = _batch_size_with_partial_last_batch(len(ds.train))
    batches = list(iterate_batches(ds.train, bs, shuffle=True, seed=0, epoch=0))
    assert 0 < int(np.sum(batches[-1][1].sample_mask)) < bs
    sizes = []
    for inputs, targets in batches:
        old_leaf = jax.tree_util.tree_leaves(state.params)[0]
        state, metrics = steps.train(state, inputs, targets)
        jax.block_until_ready(metrics)
        assert old_leaf.is_deleted()  # the state was donated
        sizes.append(steps.train._cache_size())
    assert sizes == [1] * len(sizes), sizes
    assert int(state.step) == len(batches)
