"""The data as known on a date (``han_jax.data.known_at``): what a backtest origin may read, and nothing after it."""

import dataclasses

import numpy as np
import pytest

from han_jax.config import DataConfig
from han_jax.data import DataError, build_datasets, known_at, make_world
from tests.helpers import tiny_config

ORIGIN = np.datetime64("2022-10-01")


def _world():
    return make_world(tiny_config().data)


def _changed_after(world, day):
    """``world`` with every value and target dated on or after ``day`` changed (and a record removed)."""
    def table(t):
        later = np.asarray(t.dates, "datetime64[D]") >= day
        values = np.where(later[:, None], np.asarray(t.values) * 3.0 + 7.0, t.values)
        keep = ~(later & (np.arange(len(later)) == np.flatnonzero(later)[0])) if later.any() else np.ones_like(later)
        return dataclasses.replace(t, dates=np.asarray(t.dates)[keep], values=values[keep])

    dt = world.day_targets
    later = np.asarray(dt.dates, "datetime64[D]") >= day
    day_targets = dataclasses.replace(dt, phase_index=np.where(later, 10 - np.asarray(dt.phase_index), dt.phase_index),
                                      is_transition=np.where(later, ~np.asarray(dt.is_transition, bool),
                                                             dt.is_transition))
    mt = world.month_targets
    mlater = np.asarray(mt.months, "datetime64[D]") >= day
    month_targets = dataclasses.replace(mt, fatalities=np.where(mlater, np.asarray(mt.fatalities) * 5 + 1,
                                                                mt.fatalities))
    return dataclasses.replace(world, daily={k: table(t) for k, t in world.daily.items()},
                               monthly={k: table(t) for k, t in world.monthly.items()}, day_targets=day_targets,
                               month_targets=month_targets)


def test_known_at_keeps_only_what_was_published_before_the_origin():
    world = _world()
    cut = known_at(world, str(ORIGIN), [("sentinel", 2)])
    for t in cut.daily.values():
        assert np.asarray(t.dates, "datetime64[D]").max() == ORIGIN - np.timedelta64(1, "D")
    assert np.asarray(cut.monthly["hdx_conflict"].dates, "datetime64[D]").max() == np.datetime64("2022-09-01")
    # Published two months late: August and September are not out yet on October 1st.
    assert np.asarray(cut.monthly["sentinel"].dates, "datetime64[D]").max() == np.datetime64("2022-07-01")
    assert np.asarray(cut.day_targets.dates, "datetime64[D]").max() < ORIGIN
    assert np.asarray(cut.month_targets.months, "datetime64[D]").max() == np.datetime64("2022-09-01")
    assert cut.report[-1].startswith("data as known at 2022-10-01") and "sentinel 2 month(s)" in cut.report[-1]
    # The whole world is not touched.
    assert np.asarray(world.daily["personnel"].dates, "datetime64[D]").max() > ORIGIN


def test_make_world_applies_the_configured_cut():
    data = dataclasses.replace(tiny_config().data, known_at=str(ORIGIN))
    a, b = make_world(data), known_at(_world(), str(ORIGIN))
    for name in a.daily:
        np.testing.assert_array_equal(a.daily[name].values, b.daily[name].values)
        np.testing.assert_array_equal(a.daily[name].dates, b.daily[name].dates)


def test_the_data_of_an_origin_does_not_depend_on_anything_after_it():
    data = dataclasses.replace(tiny_config().data, known_at=str(ORIGIN))
    whole = _world()
    changed = _changed_after(whole, ORIGIN)
    # The change is real: without the cut the two worlds' data differ.
    uncut_a = build_datasets(whole, dataclasses.replace(data, known_at=None))
    uncut_b = build_datasets(changed, dataclasses.replace(data, known_at=None))
    assert not np.array_equal(uncut_a.train.store.daily["personnel"], uncut_b.train.store.daily["personnel"])
    a = build_datasets(known_at(whole, str(ORIGIN)), data)
    b = build_datasets(known_at(changed, str(ORIGIN)), data)
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        np.testing.assert_array_equal(sa.anchors, sb.anchors)
        for key in sa.targets:
            np.testing.assert_array_equal(sa.targets[key], sb.targets[key], err_msg=f"{split}/{key}")
    for kind in ("daily", "monthly"):
        for name, values in getattr(a.train.store, kind).items():
            np.testing.assert_array_equal(values, getattr(b.train.store, kind)[name], err_msg=name)
    stats_a, stats_b = a.normalisation.stats.combined(), b.normalisation.stats.combined()
    for name in stats_a.mean:
        np.testing.assert_array_equal(stats_a.mean[name], stats_b.mean[name], err_msg=name)
        np.testing.assert_array_equal(stats_a.std[name], stats_b.std[name], err_msg=name)


@pytest.mark.parametrize("lags, known, message", [
    ((("nowhere", 1),), "2022-10-01", "data.publication_lags names ['nowhere']"),
    ((("sentinel", -1),), "2022-10-01", "expected [source, months] with months an integer >= 0"),
    ((("sentinel", 1), ("sentinel", 2)), "2022-10-01", "names 'sentinel' twice"),
    ((), "October", "data.known_at='October'; expected a date YYYY-MM-DD"),
    ((), "2022-02-01", "has no record before 2022-02-01"),
])
def test_bad_cuts_are_one_line_errors(lags, known, message):
    data = dataclasses.replace(DataConfig.small(), known_at=known, publication_lags=lags)
    with pytest.raises(DataError) as e:
        make_world(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lags_without_an_origin_are_reported_not_applied():
    data = dataclasses.replace(DataConfig.small(), publication_lags=(("sentinel", 2),))
    world = make_world(data)
    assert world.report[-1].startswith("data.publication_lags not applied")
    assert np.asarray(world.monthly["sentinel"].dates)[-1] == np.asarray(make_world(DataConfig.small())
                                                                          .monthly["sentinel"].dates)[-1]
