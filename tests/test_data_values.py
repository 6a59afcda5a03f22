"""Every value of the loss records is checked: bad ones stop the load with one line naming file, field, date
and value, or, with ``DataConfig.implausible_values`` clip/drop, are repaired with one report line each."""

import json
import os
import shutil

import numpy as np
import pytest

from han_jax.app.validation import validate_config
from han_jax.config import ConfigError, DataConfig, get_config
from han_jax.data import DataError, build_datasets, iterate_batches, load_losses_world, make_world

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "losses")
EQUIPMENT = "russia_losses_equipment.json"
PERSONNEL = "russia_losses_personnel.json"


def _fixture_with(tmp_path, which, index, field, value_text):
    """A copy of the trimmed fixture whose record ``index`` of ``which`` has ``field`` set to the raw JSON
    text ``value_text`` (so values json.dumps cannot write, such as 1e309, reach the loader as written)."""
    d = tmp_path / "losses"
    shutil.copytree(FIXTURE, d)
    path = d / which
    os.chmod(path, 0o644)
    recs = json.loads(path.read_text())
    recs[index][field] = "__VALUE__"
    path.write_text(json.dumps(recs).replace('"__VALUE__"', value_text))
    return str(d), recs[index]["date"]


@pytest.mark.parametrize("text, shown", [("1e30", "1e+30"), ("Infinity", "inf"), ("1e309", "inf"),
                                         ('"nan"', "'nan'"), ("NaN", "nan"), ("-3", "-3")])
def test_implausible_value_is_a_one_line_error(tmp_path, text, shown):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", text)
    with pytest.raises(DataError) as e:
        load_losses_world(d)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{EQUIPMENT}: field 'tank' is {shown} on {date}; expected" in msg
    assert "implausible_values" in msg  # says how to load it anyway


def test_error_names_the_expectation(tmp_path):
    d, _ = _fixture_with(tmp_path, PERSONNEL, 3, "personnel", "1e30")
    with pytest.raises(DataError, match=r"russia_losses_personnel.json: field 'personnel' is 1e\+30 on 2022-02-28; "
                                        r"expected at most 1e\+07"):
        load_losses_world(d)
    d, _ = _fixture_with(tmp_path / "b", EQUIPMENT, 10, "tank", "-3")
    with pytest.raises(DataError, match=r"field 'tank' is -3 on 2022-03-07; expected non-negative cumulative counts"):
        load_losses_world(d)
    d, _ = _fixture_with(tmp_path / "c", EQUIPMENT, 10, "tank", "Infinity")
    with pytest.raises(DataError, match=r"field 'tank' is inf on 2022-03-07; expected a finite number"):
        load_losses_world(d)


def test_bad_value_fails_before_feature_work(tmp_path, monkeypatch):
    """The check runs while reading: no feature engineering starts on a file with a bad value."""
    from han_jax.data import features

    def boom(*a, **k):
        raise AssertionError("feature work started before the value check")

    monkeypatch.setattr(features, "personnel_features", boom)
    d, _ = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", "1e30")
    with pytest.raises(DataError, match="field 'tank'"):
        load_losses_world(d)


def _cfg(d, how):
    return DataConfig.losses(d, daily_seq_len=60, monthly_seq_len=3, implausible_values=how)


def _finite_everywhere(ds):
    for split in (ds.train, ds.val, ds.test):
        for inputs, targets in iterate_batches(split, 64):
            for x in list(inputs.daily_features.values()) + list(inputs.monthly_features.values()):
                assert np.isfinite(x).all()
            assert np.isfinite(targets.forecast_targets).all()
    for name in ds.stats.mean:
        assert np.isfinite(ds.stats.mean[name]).all() and np.isfinite(ds.stats.std[name]).all(), name


@pytest.mark.parametrize("text, shown", [("1e30", "1e+30"), ("Infinity", "inf"), ("-3", "-3")])
def test_clip_reports_and_normalises_finitely(tmp_path, text, shown):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", text)
    w = make_world(_cfg(d, "clip"))
    lines = [r for r in w.report if f"field 'tank' on {date} is {shown}" in r]
    assert len(lines) == 1
    clipped_to = "0" if text == "-3" else "1e+07"
    assert f"clipped to {clipped_to}" in lines[0] and "implausible_values=clip" in lines[0]
    _finite_everywhere(build_datasets(w, _cfg(d, "clip")))


@pytest.mark.parametrize("how", ["clip", "drop"])
def test_nan_is_dropped_even_when_clipping(tmp_path, how):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", "NaN")
    w = make_world(_cfg(d, how))
    (line,) = [r for r in w.report if f"field 'tank' on {date} is nan" in r]
    assert "dropped" in line and f"implausible_values={how}" in line
    _finite_everywhere(build_datasets(w, _cfg(d, how)))


def test_drop_reports_and_normalises_finitely(tmp_path):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "drone", "1e30")
    w = make_world(_cfg(d, "drop"))
    (line,) = [r for r in w.report if "field 'drone' on" in r]
    assert f"{EQUIPMENT}: field 'drone' on {date} is 1e+30 (above the ceiling 1e+07); dropped" in line
    # The dropped record is missing: the counter has a hole there, reported with the others.
    assert [r for r in w.report if "field 'drone'" in r and "1 records without it" in r]
    _finite_everywhere(build_datasets(w, _cfg(d, "drop")))


def test_string_value_is_dropped_per_record(tmp_path):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", '"unknown"')
    w = load_losses_world(d)
    (line,) = [r for r in w.report if "'unknown'" in r]
    assert line.startswith(f"{EQUIPMENT}: field 'tank' on {date} is 'unknown', not a number; that record's "
                           "value is dropped")
    assert not [r for r in w.report if "ignored" in r]  # the field itself is used
    assert [r for r in w.report if "field 'tank'" in r and "1 records without it" in r]
    assert np.isfinite(w.daily["armor"].values).all()


def test_number_written_as_text_is_read_and_reported(tmp_path):
    d, date = _fixture_with(tmp_path, EQUIPMENT, 10, "tank", '"300"')
    w = load_losses_world(d)
    assert [r for r in w.report if f"field 'tank' has 1 value(s) written as text (first on {date}); read as" in r]


def test_text_fields_are_reported_once_as_unused():
    w = load_losses_world(FIXTURE)
    lines = [r for r in w.report if "greatest losses direction" in r]
    assert lines == [f"{EQUIPMENT}: text field(s) ['greatest losses direction'] (no numeric value in any record) "
                     "not used"]
    assert [r for r in w.report if r.startswith(PERSONNEL) and "['personnel*']" in r]


def test_the_setting_is_checked_before_any_data():
    config = get_config("tiny")
    bad = config.replace(data=DataConfig.losses(FIXTURE, implausible_values="fix"))
    with pytest.raises(ConfigError, match=r"implausible_values='fix'; expected one of 'error', 'clip', 'drop'"):
        validate_config(bad)
    with pytest.raises(DataError, match="implausible_values"):
        load_losses_world(FIXTURE, implausible_values="fix")
