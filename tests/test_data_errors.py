"""Each kind of bad input gives an error that names the file / source / field and what was expected."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from han_jax.data import (
    DataConfig,
    DataError,
    MissingFileError,
    build_datasets,
    load_losses_world,
    make_synthetic_world,
)

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "losses")


@pytest.fixture
def small_world():
    return make_synthetic_world(0, "learnable", "small")


def _copy_fixture(tmp_path, edit=None, which="russia_losses_equipment.json"):
    d = tmp_path / "losses"
    shutil.copytree(FIXTURE, d)
    if edit is not None:
        path = d / which
        os.chmod(path, 0o644)
        recs = json.loads(path.read_text())
        edit(recs)
        path.write_text(json.dumps(recs))
    return str(d)


def test_missing_file(tmp_path):
    d = _copy_fixture(tmp_path)
    os.remove(os.path.join(d, "russia_losses_personnel.json"))
    with pytest.raises(MissingFileError, match="russia_losses_personnel.json.*not found"):
        load_losses_world(d)
    with pytest.raises(FileNotFoundError):
        load_losses_world(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="monthly CSV directory not found"):
        load_losses_world(FIXTURE, str(tmp_path / "no_csv_here"))


def test_wrong_feature_count(small_world):
    with pytest.raises(DataError, match=r"daily source 'personnel' .* has 12 features, expected 11"):
        build_datasets(small_world, DataConfig.small(daily_sources=(("personnel", 11), ("drones", 9))))
    with pytest.raises(DataError, match=r"monthly source 'iom' is not in the data"):
        build_datasets(small_world, DataConfig.small(monthly_sources=("sentinel", "iom")))


def test_wrong_feature_count_csv(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "sentinel.csv").write_text("date,s1_radar,s2_optical\n2022-05,1,2\n2022-06,3\n")
    with pytest.raises(DataError, match=r"sentinel.csv: line 3 has 2 cells; expected 3"):
        load_losses_world(FIXTURE, str(csv_dir))
    (csv_dir / "sentinel.csv").write_text("date,s1_radar,s2_optical\n2022-05,1,2\n")
    w = load_losses_world(FIXTURE, str(csv_dir))
    with pytest.raises(DataError, match=r"monthly source 'sentinel' .*sentinel.csv.* has 2 features, expected 7"):
        build_datasets(w, DataConfig.losses(FIXTURE, str(csv_dir), monthly_sources=(("sentinel", 7),),
                                            daily_seq_len=60, monthly_seq_len=3))


def test_duplicate_and_unsorted_dates(tmp_path, small_world):
    d = _copy_fixture(tmp_path, lambda r: r.insert(5, dict(r[5])))
    with pytest.raises(DataError, match=r"russia_losses_equipment.json: duplicate date 2022-03-02"):
        load_losses_world(d)
    d2 = _copy_fixture(tmp_path / "b", lambda r: r.__setitem__(slice(3, 5), [r[4], r[3]]))
    with pytest.raises(DataError, match=r"russia_losses_equipment.json: dates not monotonic"):
        load_losses_world(d2)
    t = small_world.daily["drones"]
    small_world.daily["drones"] = dataclasses.replace(t, dates=t.dates[::-1].copy())
    with pytest.raises(DataError, match=r"daily source 'drones' .*not monotonic"):
        build_datasets(small_world, DataConfig.small())


def test_all_nan_column(small_world, tmp_path):
    t = small_world.monthly["sentinel"]
    v = t.values.copy()
    v[:, 2] = np.nan
    small_world.monthly["sentinel"] = dataclasses.replace(t, values=v)
    with pytest.raises(DataError, match=r"monthly source 'sentinel'.*\['s3_fire'\] are entirely NaN"):
        build_datasets(small_world, DataConfig.small())
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "iom.csv").write_text("date,idp_total,round_number\n2022-05,10,\n2022-06,12,\n")
    with pytest.raises(DataError, match=r"iom.csv: column\(s\) \['round_number'\] are entirely empty"):
        load_losses_world(FIXTURE, str(csv_dir))


def test_negative_counts(tmp_path):
    def edit(recs):
        recs[10]["tank"] = -3

    d = _copy_fixture(tmp_path, edit)
    with pytest.raises(DataError, match=r"russia_losses_equipment.json: field 'tank' is -3 on 2022-03-07; "
                                        r"expected non-negative"):
        load_losses_world(d)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "targets_fatalities.csv").write_text("date,fatalities\n2022-05,10\n2022-06,-4\n")
    with pytest.raises(DataError, match=r"targets_fatalities.csv: column 'fatalities' has negative values"):
        load_losses_world(FIXTURE, str(csv_dir))


def test_window_longer_than_data(small_world):
    with pytest.raises(DataError, match=r"daily_seq_len=365 is longer than the data.*300 days"):
        build_datasets(small_world, DataConfig.small(daily_seq_len=365))
    with pytest.raises(DataError, match=r"split 'train' has no valid anchors"):
        build_datasets(small_world, DataConfig.small(daily_seq_len=250))


def test_bad_csv_values(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "iom.csv").write_text("date,idp_total\n2022-05,ten\n")
    with pytest.raises(DataError, match=r"iom.csv: line 2, column 2 is not a number; expected a number or empty$"):
        load_losses_world(FIXTURE, str(csv_dir))
    (csv_dir / "iom.csv").write_text("when,idp_total\n2022-05,1\n")
    with pytest.raises(DataError, match=r"iom.csv: no 'date' column"):
        load_losses_world(FIXTURE, str(csv_dir))
