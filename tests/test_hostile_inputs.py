"""What a careless or hostile-but-ordinary input does: one line and exit status 2, never a traceback,
no file outside the run touched, nothing the user typed ignored.

Every case runs ``han-jax`` in this process (``han_jax.cli.main``) on a copy of the session's tiny run
or on a fresh folder; the ones that train reuse the session's compiled tiny steps (the learning rate is a
run-time value), so none compiles a program of its own.
"""

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from han_jax.app import torch_import
from han_jax.cli import main
from han_jax.core.files import append_text
from han_jax.data import DataError
from han_jax.data.loss_records import EQUIPMENT_FILE, PERSONNEL_FILE, bundled_losses_dir, load_losses_world
from han_jax.training import compilation_cache

TINY = ["--preset", "tiny", "--quiet", "--no-tensorboard"]


@pytest.fixture
def run_copy(tiny_run_dir, tmp_path):
    """A copy of the session's finished tiny run, to damage."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run_dir, run_dir)
    return run_dir


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"han-jax {command}: error: "), err
    assert "Traceback" not in err
    return lines[0][len(f"han-jax {command}: error: "):]


def _strict_json(text: str):
    """``json.loads`` that rejects NaN and Infinity, as any non-Python reader does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------
# No file outside the run is touched.
# ---------------------------------------------------------------------------


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(victim, run_dir / ".lock")
    assert main(["train", *TINY, "--run-dir", str(run_dir), "--resume"]) == 2
    message = _one_line_error(capsys, "train")
    assert message == (f"{run_dir}/.lock: is a symbolic link; expected a regular file written by han-jax "
                       "(remove the link)")
    assert victim.read_text() == "precious\n"


def test_appending_metrics_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "metrics.jsonl")
    with pytest.raises(FileExistsError, match="metrics.jsonl: is a symbolic link"):
        append_text(str(tmp_path / "metrics.jsonl"), "{}\n")
    assert victim.read_text() == "precious\n"
    append_text(str(tmp_path / "real.jsonl"), "a\n")
    append_text(str(tmp_path / "real.jsonl"), "b\n")
    assert (tmp_path / "real.jsonl").read_text() == "a\nb\n"


@pytest.mark.parametrize("out", ["config.json", "summary.json", "predictions.csv", "checkpoints/best/x.csv"])
def test_predict_and_evaluate_never_write_over_the_run_s_own_files(run_copy, capsys, out, monkeypatch):
    """Refused before the run is loaded (no slow work); --force is the user's way to say it is meant."""
    before = {name: open(os.path.join(run_copy, name), "rb").read() for name in ("config.json", "summary.json")}
    path = os.path.join(run_copy, out)
    assert main(["predict", "--run-dir", run_copy, "--out", path]) == 2
    assert _one_line_error(capsys, "predict").startswith(f"--out {path}: ")
    assert main(["evaluate", "--run-dir", run_copy, "--out", path]) == 2
    assert "expected a path outside the run's files" in _one_line_error(capsys, "evaluate")
    # The relative default of a command run inside the run folder.
    monkeypatch.chdir(run_copy)
    assert main(["predict", "--run-dir", ".", "--out", "predictions.csv"]) == 2
    assert "is the run folder" in _one_line_error(capsys, "predict")
    assert {name: open(os.path.join(run_copy, name), "rb").read() for name in before} == before


def test_an_output_path_that_is_a_folder_is_refused_up_front(run_copy, tmp_path, capsys):
    assert main(["evaluate", "--run-dir", run_copy, "--out", str(tmp_path)]) == 2
    assert _one_line_error(capsys, "evaluate") == f"--out {tmp_path}: is a folder; expected the path of a file to write"


def test_a_planted_cache_entry_is_never_unpickled(tmp_path, capsys):
    """An entry replaced by a crafted pickle: its payload does not run; it is reported and compiled again."""
    import jax.numpy as jnp

    folder = str(tmp_path / "executables")
    compilation_cache.set_executable_dir(folder)
    try:
        fn = compilation_cache.persistent(jax_jit_add_one(), "hostile", "k")
        x = jnp.ones((3,))
        np.testing.assert_array_equal(fn(x), 2.0)
        (entry,) = compilation_cache.stored_entries(folder)
        marker = tmp_path / "payload-ran"
        with open(os.path.join(folder, entry), "wb") as f:
            f.write(pickle.dumps(_Payload(str(marker))))
        again = compilation_cache.persistent(jax_jit_add_one(), "hostile", "k")
        np.testing.assert_array_equal(again(x), 2.0)
        assert not marker.exists()
        err = capsys.readouterr().err
        assert "could not be loaded (ValueError: not a han-jax executable entry); compiling it again" in err
        # Rewritten, signed; the key is the owner's alone.
        assert open(os.path.join(folder, entry), "rb").read().startswith(b"han-jax-executable-1\n")
        assert os.stat(os.path.join(folder, compilation_cache.KEY_FILE)).st_mode & 0o777 == 0o600
    finally:
        compilation_cache.set_executable_dir(None)


def test_an_entry_signed_under_another_key_is_refused(tmp_path, capsys):
    import jax.numpy as jnp

    other, mine = str(tmp_path / "other"), str(tmp_path / "mine")
    x = jnp.ones((3,))
    for folder in (other, mine):
        compilation_cache.set_executable_dir(folder)
        compilation_cache.persistent(jax_jit_add_one(), "signed", "k")(x)
    compilation_cache.set_executable_dir(mine)
    try:
        (entry,) = compilation_cache.stored_entries(mine)
        shutil.copy(os.path.join(other, entry), os.path.join(mine, entry))  # a valid entry, another key
        np.testing.assert_array_equal(compilation_cache.persistent(jax_jit_add_one(), "signed", "k")(x), 2.0)
        assert "integrity check failed" in capsys.readouterr().err
    finally:
        compilation_cache.set_executable_dir(None)


@pytest.mark.parametrize("damage, reason", [
    (lambda path: os.chmod(path, 0o777), "writable by others (mode 777)"),
    (lambda path: os.chown(path, 12345, -1), "owned by uid 12345, not by you"),
])
def test_a_cache_folder_others_can_write_is_not_used(tmp_path, capsys, damage, reason, monkeypatch):
    if not hasattr(os, "getuid") or (reason.startswith("owned") and os.getuid() != 0):
        pytest.skip("chown to another user needs root")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    folder = tmp_path / "shared"
    folder.mkdir()
    damage(str(folder))
    try:
        assert compilation_cache.enable_compilation_cache(str(folder)) is None
        assert compilation_cache._executable_dir is None
    finally:
        compilation_cache.set_executable_dir(None)
    err = capsys.readouterr().err.strip()
    assert err == (f"han-jax: compilation cache {folder} is {reason}" + err.split(reason, 1)[1])
    assert err.endswith("expected a folder of yours that only you can write (its entries are code): compiling "
                        "without it")


def jax_jit_add_one():
    import jax

    return jax.jit(lambda x: x + 1.0)


class _Payload:
    """What a crafted pickle does when loaded: here, leave a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------
# Paths and contents of a run folder from someone else.
# ---------------------------------------------------------------------------


def test_data_folders_named_by_a_run_are_reported_and_their_content_not_echoed(run_copy, tmp_path, capsys):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "secrets.csv").write_text("SECRET-TOKEN-123,another\n1,2\n")
    path = os.path.join(run_copy, "config.json")
    config = json.load(open(path))
    config["data"].update(source="losses", monthly_csv_dir=str(folder))
    json.dump(config, open(path, "w"))
    assert main(["evaluate", "--run-dir", run_copy]) == 2
    out, err = capsys.readouterr()
    assert f"data: monthly_csv_dir {folder}, as saved in {path}" in out
    assert "SECRET" not in out + err
    assert err.strip() == (f"han-jax evaluate: error: {folder}/secrets.csv: no 'date' column in the header (line 1); "
                           "expected 'date' plus feature columns")


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["model"].update(d_model=-5), "config.json: model.d_model=-5: expected"),
    (lambda c: c["model"].update(d_model=30), "config.json: model.d_model=30: expected d_model // 4 a multiple of 4"),
    # Valid, but not the model the checkpoint holds.
    (lambda c: c["model"].update(d_model=32), "written for another model"),
])
def test_an_edited_saved_configuration_is_validated_when_loaded(run_copy, capsys, edit, expected):
    path = os.path.join(run_copy, "config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))
    for command in (["evaluate", "--run-dir", run_copy], ["predict", "--run-dir", run_copy]):
        assert main(command) == 2
        message = _one_line_error(capsys, command[0])
        assert message.startswith(os.path.join(run_copy, "")) and expected in message, message


def test_saved_files_that_are_not_text_or_json_name_the_file(run_copy, capsys):
    config = os.path.join(run_copy, "config.json")
    with open(config, "wb") as f:
        f.write(b"\xff\xfe{")
    assert main(["evaluate", "--run-dir", run_copy]) == 2
    assert _one_line_error(capsys, "evaluate") == (f"{config}: not UTF-8 text (byte 0); expected the JSON file "
                                                   "han-jax wrote")
    with open(config, "w") as f:
        f.write('{"model": ')
    assert main(["evaluate", "--run-dir", run_copy]) == 2
    assert _one_line_error(capsys, "evaluate").startswith(f"{config}: not valid JSON (line 1, column 11: ")


@pytest.mark.parametrize("which, part", [("best", "_METADATA"), ("best", "blob"), ("latest", "blob")])
def test_a_damaged_checkpoint_names_its_folder_and_the_other_checkpoint(run_copy, capsys, which, part):
    root = os.path.join(run_copy, "checkpoints", which)
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    if part == "_METADATA":
        victims = [f for f in files if os.path.basename(f) == "_METADATA" and os.sep + "state" + os.sep in f]
    else:  # the array data of the state: the largest file
        victims = [max((f for f in files if os.sep + "state" + os.sep in f), key=os.path.getsize)]
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(max(os.path.getsize(victim) // 3, 1))
    other = {"best": "latest", "latest": "best"}[which]
    assert main(["evaluate", "--run-dir", run_copy, "--checkpoint", which]) == 2
    message = _one_line_error(capsys, "evaluate")
    assert message.startswith(root + os.sep) and "the checkpoint cannot be read" in message
    assert message.endswith(f"(the {other} checkpoint may be intact: --checkpoint {other})")


# ---------------------------------------------------------------------------
# Nothing the user typed is ignored.
# ---------------------------------------------------------------------------


def test_resume_compares_a_typed_preset_and_data_kind(run_copy, capsys):
    before = open(os.path.join(run_copy, "config.json")).read()
    assert main(["train", "--run-dir", run_copy, "--resume", "--preset", "small", "--epochs", "2", "--quiet"]) == 2
    message = _one_line_error(capsys, "train")
    assert message.startswith(f"--resume: {run_copy}/config.json differs in ")
    assert "model.d_model (saved 16, requested 32)" in message
    assert main(["train", "--run-dir", run_copy, "--resume", "--data", "losses", "--quiet"]) == 2
    assert 'data.source (saved "synthetic", requested "losses")' in _one_line_error(capsys, "train")
    assert open(os.path.join(run_copy, "config.json")).read() == before


def test_a_data_folder_without_real_data_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "run"), "--losses-dir", str(tmp_path)]) == 2
    assert _one_line_error(capsys, "train") == ("--losses-dir: real-data folders are read with --data losses; "
                                                "expected --data losses too")


# ---------------------------------------------------------------------------
# One line, never a traceback.
# ---------------------------------------------------------------------------


def test_a_batch_larger_than_the_training_split_is_refused_before_compiling(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run_dir), "--batch-size", "100000"]) == 2
    message = _one_line_error(capsys, "train")
    assert message.startswith("train.batch_size=100000: expected at most the ") and message.endswith(
        " training anchors of this data")
    assert not run_dir.exists()


def test_a_run_that_never_has_a_finite_validation_total_ends_in_one_line_and_valid_json(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["train", *TINY, "--run-dir", run_dir, "--epochs", "2", "--set",
                 "step.optim.learning_rate=1e30"]) == 2
    message = _one_line_error(capsys, "train")
    assert message.startswith(f"{run_dir}: no epoch had a finite validation weighted_total")
    rows = [_strict_json(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(e, p) for e in (0, 1) for p in ("train", "val", "test")]
    val = [r for r in rows if r["phase"] == "val"]
    assert all(r["metrics"]["weighted_total"] is None and "weighted_total" in r["non_finite"] for r in val)
    summary = _strict_json(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["best_epoch"] is None and summary["final"] is None
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "latest"))


def test_a_full_disk_is_one_line_and_the_run_resumable(tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr("han_jax.app.train.append_text", full)
    assert main(["train", *TINY, "--run-dir", run_dir, "--epochs", "1"]) == 2
    assert _one_line_error(capsys, "train") == (f"no space left on the device while writing {run_dir}/metrics.jsonl; "
                                                "the run folder is resumable with --resume once there is space")


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.json"),
     "/data/x.json: Permission denied; expected a file or folder you may read and write"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"),
     "/data/x: Is a directory; expected a file, not a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/run"),
     "/data/f/run: Not a directory; expected a folder, or a path through folders"),
])
def test_os_errors_name_the_file(monkeypatch, capsys, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("han_jax.cli.evaluate_run", fail)
    assert main(["evaluate", "--run-dir", "r"]) == 2
    assert _one_line_error(capsys, "evaluate") == expected


def test_a_run_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "afile" / "run")]) == 2
    assert _one_line_error(capsys, "train").startswith(f"{tmp_path}/afile/run: Not a directory")


def test_ctrl_c_is_one_line_and_says_how_to_go_on(monkeypatch, capsys, tmp_path, tiny_run_dir):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("han_jax.cli.train", interrupted)
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "new")]) == 130
    assert capsys.readouterr().err == ("han-jax train: interrupted before the run's first checkpoint; start it again "
                                       "(without --resume)\n")
    assert main(["train", *TINY, "--run-dir", tiny_run_dir, "--resume"]) == 130
    assert capsys.readouterr().err == "han-jax train: interrupted; resume with --resume\n"


class _TorchLoading:
    """Enough of torch for read_torch_checkpoint to see what torch.load returned (runs without torch)."""

    class Tensor:
        pass

    def __init__(self, loaded):
        self.loaded = loaded

    def load(self, path, **kwargs):
        if isinstance(self.loaded, Exception):
            raise self.loaded
        return self.loaded


@pytest.mark.parametrize("loaded, expected", [
    ({"model_state_dict": 5}, "'model_state_dict' holds a int; expected a state_dict (a dict of tensors)"),
    ({"model_state_dict": {}, "multi_task_loss_state_dict": [1]},
     "'multi_task_loss_state_dict' holds a list; expected a state_dict (a dict of tensors)"),
    (RuntimeError("PytorchStreamReader failed reading zip archive"),
     "not a torch checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive)"),
])
def test_an_import_of_a_checkpoint_that_holds_no_state_dict(tmp_path, capsys, monkeypatch, loaded, expected):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not read: torch.load is replaced")
    monkeypatch.setattr(torch_import, "_import_torch", lambda: _TorchLoading(loaded))
    assert main(["import-torch", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert _one_line_error(capsys, "import-torch") == f"{path}: {expected}"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# A one-day spike of a cumulative counter.
# ---------------------------------------------------------------------------


@pytest.fixture
def spiked_losses(tmp_path):
    """The bundled loss records with one personnel count of 9,000,000 on one day (1.2 million around it)."""
    folder = tmp_path / "losses"
    folder.mkdir()
    shutil.copy(os.path.join(bundled_losses_dir(), EQUIPMENT_FILE), folder / EQUIPMENT_FILE)
    records = json.load(open(os.path.join(bundled_losses_dir(), PERSONNEL_FILE)))
    i = len(records) - 30
    records[i]["personnel"] = 9_000_000
    json.dump(records, open(folder / PERSONNEL_FILE, "w"))
    return str(folder), records[i]["date"], records[i - 1]["personnel"], records[i + 1]["personnel"]


def test_a_one_day_spike_of_a_cumulative_count_stops_the_load(spiked_losses):
    folder, date, _, _ = spiked_losses
    with pytest.raises(DataError, match=rf"{PERSONNEL_FILE}: field 'personnel' is 9e\+06 on {date}, a rise of .* that "
                                        r"falls back the next day \(\d+x its typical daily rise .*\); expected a "
                                        r"cumulative count without one-day spikes"):
        load_losses_world(folder)


@pytest.mark.parametrize("how", ["clip", "drop"])
def test_a_one_day_spike_is_repaired_on_request_with_a_report_line(spiked_losses, how):
    folder, date, before, after = spiked_losses
    world = load_losses_world(folder, implausible_values=how)
    lines = [line for line in world.report if "field 'personnel' is 9e+06" in line]
    assert len(lines) == 1 and f"(data.implausible_values={how})" in lines[0]
    if how == "clip":
        assert lines[0].endswith(f"clipped to {max(before, after):g} (data.implausible_values=clip)")
    else:
        assert lines[0].endswith("dropped, missing: deltas 0 around it (data.implausible_values=drop)")
    # The repaired personnel source is as large as the clean one's, not millions.
    clean = load_losses_world()
    assert np.nanmax(np.abs(world.daily["personnel"].values)) <= 1.01 * np.nanmax(
        np.abs(clean.daily["personnel"].values))


def test_the_bundled_records_have_no_spike():
    world = load_losses_world()
    assert not [line for line in world.report if "falls back the next day" in line]
