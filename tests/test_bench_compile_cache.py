"""One compilation per step across an epoch, the last partial batch included.

The batches of ``iterate_batches`` have a fixed shape (a short last batch is padded and
masked by ``sample_mask``), so a whole epoch through the eval and train steps must reuse
one executable each; ``train`` donates the state.
"""

import jax
import numpy as np

from han_jax.data import iterate_batches
from tests.helpers import B, fresh


def test_eval_and_train_compile_once_per_epoch(tiny):
    ds, steps = tiny.datasets, tiny.steps
    for split in (ds.val, ds.train):
        assert len(split) % B, "the tiny splits end with a partial batch at the session's batch size"

    batches = list(iterate_batches(ds.val, B))
    assert len(batches) >= 2
    assert 0 < int(np.sum(batches[-1][1].sample_mask)) < B  # the padded last batch is covered
    state = fresh(tiny.state)
    sizes = []
    for inputs, targets in batches:
        jax.block_until_ready(steps.eval(state, inputs, targets))
        sizes.append(steps.compiled.eval._cache_size())
    assert sizes == [sizes[0]] * len(sizes) and sizes[0] == 1, sizes

    batches = list(iterate_batches(ds.train, B, shuffle=True, seed=0, epoch=0))
    assert 0 < int(np.sum(batches[-1][1].sample_mask)) < B
    sizes = []
    start = int(state.step)
    for inputs, targets in batches:
        old_leaf = jax.tree_util.tree_leaves(state.params)[0]
        state, out = steps.train(state, inputs, targets)
        jax.block_until_ready(out)
        assert old_leaf.is_deleted()  # the state was donated
        sizes.append(steps.compiled.train._cache_size())
    assert sizes == [1] * len(sizes), sizes
    assert int(state.step) == start + len(batches)
