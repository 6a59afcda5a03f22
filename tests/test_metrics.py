"""Epoch accumulation: row-weighted means, the last partial batch neither dropped nor over-weighted."""

import numpy as np

from han_jax.metrics import MetricAccumulator


def _batch(total, n_rows, acc, n_regime, correct, count, mae=None, n_cas=0.0):
    return {
        "weighted_total": total, "n_rows": n_rows, "regime_accuracy": acc, "n/regime": n_regime,
        "regime_class_correct": np.array(correct, float), "regime_class_count": np.array(count, float),
        "casualty_mae": 0.0 if mae is None else mae, "n/casualty": n_cas, "learning_rate": 1e-3,
    }


def test_means_weight_by_real_rows_and_counts_add_up():
    acc = MetricAccumulator()
    acc.update(_batch(2.0, 8.0, 0.5, 6.0, [2, 1], [4, 2]))
    acc.update(_batch(5.0, 2.0, 1.0, 2.0, [0, 2], [0, 2]))  # the last, partial batch
    out = acc.result()
    np.testing.assert_allclose(out["weighted_total"], (2.0 * 8 + 5.0 * 2) / 10)  # not (2 + 5) / 2
    np.testing.assert_allclose(out["regime_accuracy"], (0.5 * 6 + 1.0 * 2) / 8)  # by valid regime rows
    assert out["n_rows"] == 10.0 and out["n/regime"] == 8.0
    assert out["regime_class_count"] == [4.0, 4.0]
    # balanced accuracy from the epoch's class sums: (2/4 + 3/4) / 2
    np.testing.assert_allclose(out["regime_balanced_accuracy"], 0.625)
    assert out["casualty_mae"] is None  # no valid casualty row all epoch: absent, not 0
    assert out["learning_rate"] == 1e-3


def test_device_axis_takes_one_copy():
    acc = MetricAccumulator()
    m = _batch(2.0, 8.0, 0.5, 6.0, [2, 1], [4, 2], mae=10.0, n_cas=3.0)
    acc.update({k: np.stack([np.asarray(v)] * 4) for k, v in m.items()}, device_axis=True)
    out = acc.result()
    assert out["n_rows"] == 8.0 and out["casualty_mae"] == 10.0
