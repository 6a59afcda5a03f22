"""Run folders have one writer, check a resume before changing anything, and survive kill -9.

The end-to-end tests (``integration``) run ``han-jax train --preset tiny --epochs 2`` as
subprocesses, as a user would; they share a persistent XLA compilation cache, so only the
first compiles (the learning rate and the epoch count are run-time values of the steps).
The resume checks run in this process on a copy of the session's tiny run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from han_jax.app import run_folder
from han_jax.app.train import _rewrite_metrics
from han_jax.cli import main
from han_jax.training.checkpoints import Checkpoints, checkpoint_epoch
from han_jax.training.steps import with_tree_accumulator

EPOCHS = 2
PHASES = ("train", "val", "test")


def _train_args(run_dir, *extra):
    return ["train", "--preset", "tiny", "--epochs", str(EPOCHS), "--run-dir", run_dir, "--quiet",
            "--no-tensorboard", *extra]


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: what 'nothing changed' compares."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _epochs_and_phases(run_dir):
    return [(r["epoch"], r["phase"]) for r in _rows(run_dir)]


def _params(run_dir, which="latest"):
    with ocp.CheckpointManager(os.path.join(run_dir, "checkpoints", which)) as mngr:
        return mngr.restore(mngr.latest_step())["state"]["params"]


def _lock_message(run_dir, pid, command="han-jax train"):
    return f"run folder {run_dir} is in use by pid {pid} ({command}); wait for it or use another --run-dir"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses' environment: conftest's XLA flags, one shared persistent compilation cache."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    out = dict(os.environ)
    out.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return out


# ``han-jax`` killed with SIGKILL in the middle of its epoch-1 ``latest`` checkpoint save: after orbax has
# written the whole step into its temporary folder and before the rename that commits it, the last moment a
# crash can leave a save unfinished. The seam is os.rename, which orbax commits with; production code has no hook.
_KILLED_IN_SAVE = """
import os, signal, sys
from han_jax.cli import main
rename = os.rename
def rename_or_die(src, dst, *args, **kwargs):
    if os.path.join("latest", "1.orbax-checkpoint-tmp") in os.fspath(src):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.rename = rename_or_die
sys.exit(main(sys.argv[1:]))
"""


def _start(args, env, log_path, kill_in_save=False):
    out, err = open(log_path + ".out", "w"), open(log_path + ".err", "w")
    launcher = ["-c", _KILLED_IN_SAVE] if kill_in_save else ["-m", "han_jax.cli"]
    proc = subprocess.Popen([sys.executable, *launcher, *args], env=env, stdout=out, stderr=err, text=True)
    proc.logs = (log_path + ".out", log_path + ".err")
    return proc


def _wait(procs, timeout=1500):
    """Each process's exit status and seconds from now until it ended."""
    start, ended = time.monotonic(), {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.monotonic() - start
        if time.monotonic() - start > timeout:
            for proc in procs:
                proc.kill()
            pytest.fail(f"training subprocesses still running after {timeout} s")
        time.sleep(0.1)
    return [(proc.returncode, ended[i]) for i, proc in enumerate(procs)]


def _stderr(proc):
    return open(proc.logs[1]).read()


@pytest.fixture(scope="module")
def contested(tmp_path_factory, env):
    """Two ``han-jax train`` processes started together on one folder, told apart by ``--patience`` (5 or 7)."""
    base = tmp_path_factory.mktemp("contested")
    run_dir = str(base / "run")
    procs = {p: _start(_train_args(run_dir, "--patience", str(p)), env, str(base / f"patience{p}")) for p in (5, 7)}
    done = dict(zip(procs, _wait(list(procs.values()))))
    return run_dir, procs, done


# ---------------------------------------------------------------------------
# One writer per run folder.
# ---------------------------------------------------------------------------


def test_a_locked_folder_refuses_a_second_writer_at_once(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write("{}")
    # flock locks belong to an open file description: this process's own second open conflicts too.
    with run_folder.lock_run_dir(run_dir, "han-jax train"):
        before = _snapshot(run_dir)
        for extra in ([], ["--resume"]):
            capsys.readouterr()
            assert main(_train_args(run_dir, *extra)) == 2
            out, err = capsys.readouterr()
            assert err == f"han-jax train: error: {_lock_message(run_dir, os.getpid())}\n"
            assert out == ""  # failed before it printed the configuration or built any data
            assert _snapshot(run_dir) == before
        with pytest.raises(run_folder.RunLocked, match="han-jax train"):
            with run_folder.lock_run_dir(run_dir, "han-jax import-torch"):
                pass
    assert sorted(os.listdir(run_dir)) == ["config.json"]  # the lock file goes with its holder


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    lock = os.path.join(run_dir, run_folder.LOCK_FILE)
    with open(lock, "w") as f:
        f.write(f"{dead_pid} han-jax train\n")
    with run_folder.lock_run_dir(run_dir, "han-jax train"):
        assert open(lock).read() == f"{os.getpid()} han-jax train\n"
    assert not os.path.exists(lock)
    assert os.path.isdir(run_dir)


def test_a_refused_new_run_leaves_no_folder(tmp_path):
    run_dir = str(tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        main(["--debug"] + _train_args(run_dir, "--resume"))
    assert not os.path.exists(run_dir)


@pytest.mark.integration
def test_two_concurrent_trainings_have_one_writer(contested):
    run_dir, procs, done = contested
    statuses = sorted(rc for rc, _ in done.values())
    assert statuses == [0, 2], {p: (rc, _stderr(procs[p])[-2000:]) for p, (rc, _) in done.items()}
    winner = next(p for p, (rc, _) in done.items() if rc == 0)
    loser = next(p for p in done if p != winner)
    assert _stderr(procs[loser]).strip().splitlines()[-1] == (
        f"han-jax train: error: {_lock_message(run_dir, procs[winner].pid)}")
    assert open(procs[loser].logs[0]).read() == ""
    assert done[loser][1] < done[winner][1] / 2, done  # it failed fast, not after training
    # Every file is the winner's, written once.
    assert json.load(open(os.path.join(run_dir, "config.json")))["train"]["patience"] == winner
    assert json.load(open(os.path.join(run_dir, "summary.json")))["config"]["train"]["patience"] == winner
    assert _epochs_and_phases(run_dir) == [(e, p) for e in range(EPOCHS) for p in PHASES]
    assert not os.path.exists(os.path.join(run_dir, run_folder.LOCK_FILE))


# ---------------------------------------------------------------------------
# Resume checks come before any write.
# ---------------------------------------------------------------------------


@pytest.fixture
def finished_copy(tiny_run_dir, tmp_path):
    """A copy of the session's tiny run (finished), to resume without touching the original."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run_dir, run_dir)
    return run_dir


def test_resume_with_another_learning_rate_is_refused_and_changes_nothing(finished_copy, capsys):
    before = _snapshot(finished_copy)
    args = _train_args(finished_copy, "--resume", "--set", "step.optim.learning_rate=0.002", "--set",
                       "model.dropout=0.2", "--epochs", "5")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"han-jax train: error: --resume: {finished_copy}/config.json differs in ")
    assert "step.optim.learning_rate (saved 0.001, requested 0.002)" in err
    assert "model.dropout (saved 0.1, requested 0.2)" in err
    assert "train.epochs" not in err  # allowed without an override
    assert err.endswith("--resume-override model.dropout,step.optim.learning_rate")
    assert _snapshot(finished_copy) == before
    # Naming one of the two is not enough.
    assert main(args + ["--resume-override", "step.optim.learning_rate"]) == 2
    assert "model.dropout (saved" in capsys.readouterr().err
    assert _snapshot(finished_copy) == before


class _PassedTheChecks(Exception):
    pass


def _stop(*args, **kwargs):
    raise _PassedTheChecks()


@pytest.mark.parametrize("extra, changed", [
    (["--set", "step.optim.learning_rate=0.002", "--resume-override", "step.optim.learning_rate"],
     ("step", "optim", "learning_rate", 0.002)),
    (["--set", "step.optim.learning_rate=0.002", "--resume-override", "model.dropout,step.optim.learning_rate"],
     ("step", "optim", "learning_rate", 0.002)),
    (["--epochs", "4"], ("train", "epochs", 4)),
])
def test_resume_with_allowed_changes_proceeds_and_records_them(finished_copy, monkeypatch, extra, changed):
    """The checks pass and the run goes on: it writes its new configuration, then builds its train state
    (stopped there: training on is the kill test's business, and here would compile another program)."""
    monkeypatch.setattr("han_jax.app.train.create_train_state", _stop)
    with pytest.raises(_PassedTheChecks):
        main(["--debug"] + _train_args(finished_copy, "--resume", *extra))
    node = json.load(open(os.path.join(finished_copy, "config.json")))
    for key in changed[:-1]:
        node = node[key]
    assert node == changed[-1]
    assert not [n for n in os.listdir(finished_copy) if n.endswith(".tmp")]


def test_resume_starts_from_the_saved_configuration(finished_copy, monkeypatch):
    """After an accepted override, a plain --resume continues with it: only what a command line states
    explicitly is compared, so the preset's defaults (another learning rate, epoch count) are never "changes"."""
    monkeypatch.setattr("han_jax.app.train.create_train_state", _stop)
    with pytest.raises(_PassedTheChecks):
        main(["--debug"] + _train_args(finished_copy, "--resume", "--set", "step.optim.learning_rate=0.002",
                                       "--resume-override", "step.optim.learning_rate"))
    saved = open(os.path.join(finished_copy, "config.json")).read()
    plain = ["train", "--run-dir", finished_copy, "--quiet", "--no-tensorboard", "--resume"]
    with pytest.raises(_PassedTheChecks):
        main(["--debug"] + plain)
    assert open(os.path.join(finished_copy, "config.json")).read() == saved
    assert json.loads(saved)["step"]["optim"]["learning_rate"] == 0.002


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(finished_copy, capsys):
    """orbax skips saving a step at or below one on disk: a new run over an old one would keep the old states."""
    before = _snapshot(finished_copy)
    assert main(_train_args(finished_copy)) == 2
    err = capsys.readouterr().err
    assert err == (f"han-jax train: error: {finished_copy}/checkpoints: holds another run's checkpoints; expected "
                   "--resume to continue it, or another --run-dir\n")
    assert _snapshot(finished_copy) == before


def test_resume_override_names_real_fields_and_needs_resume(finished_copy, capsys):
    assert main(_train_args(finished_copy, "--resume", "--resume-override", "step.optim.learning_rat")) == 2
    assert "--resume-override step.optim.learning_rat: no such configuration field" in capsys.readouterr().err
    assert main(_train_args(finished_copy, "--resume-override", "step.optim.learning_rate")) == 2
    assert "expected with --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Crash safety.
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(contested, env, tmp_path):
    run_dir = str(tmp_path / "run")
    killed = _start(_train_args(run_dir), env, str(tmp_path / "killed"), kill_in_save=True)
    [(rc, _)] = _wait([killed])
    assert rc == -signal.SIGKILL, _stderr(killed)[-3000:]
    # Epoch 1's metrics were written, its checkpoint was not committed, and the lock file is left behind.
    assert _epochs_and_phases(run_dir) == [(e, p) for e in range(2) for p in PHASES]
    latest = os.path.join(run_dir, "checkpoints", "latest")
    assert "0" in os.listdir(latest)
    assert any(n.startswith("1.orbax-checkpoint-tmp") for n in os.listdir(latest)), os.listdir(latest)
    assert open(os.path.join(run_dir, run_folder.LOCK_FILE)).read().split()[0] == str(killed.pid)

    resumed = _start(_train_args(run_dir, "--resume"), env, str(tmp_path / "resumed"))
    [(rc, _)] = _wait([resumed])
    assert rc == 0, _stderr(resumed)[-3000:]
    assert "resumed from epoch 0" in open(resumed.logs[0]).read()
    assert _epochs_and_phases(run_dir) == [(e, p) for e in range(EPOCHS) for p in PHASES]
    for which in ("latest", "best"):
        assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints", which)) if "tmp" in n]
    assert sorted(os.listdir(latest)) == [str(EPOCHS - 1)]
    assert not os.path.exists(os.path.join(run_dir, run_folder.LOCK_FILE))
    # The same run as the uninterrupted one (same seed; only --patience, which never fired, differs).
    winner = contested[0]
    chex.assert_trees_all_equal(_params(run_dir), _params(winner))
    np.testing.assert_allclose([r["metrics"]["weighted_total"] for r in _rows(run_dir)],
                               [r["metrics"]["weighted_total"] for r in _rows(winner)], rtol=1e-6)
    assert os.path.getsize(os.path.join(run_dir, "summary.json")) > 0


@pytest.mark.integration
def test_ctrl_c_during_training_is_one_line_and_the_run_resumes(contested, env, tmp_path):
    """SIGINT (what Ctrl-C sends) once epoch 0's checkpoint is complete: exit 130 and one line, no traceback."""
    run_dir = str(tmp_path / "run")
    proc = _start(_train_args(run_dir), env, str(tmp_path / "interrupted"))
    deadline = time.monotonic() + 900
    while checkpoint_epoch(run_dir) is None:
        assert proc.poll() is None and time.monotonic() < deadline, _stderr(proc)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    [(rc, _)] = _wait([proc])
    err = _stderr(proc)
    if rc == 0:
        pytest.skip("the run finished before the signal arrived")
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "han-jax train: interrupted; resume with --resume"
    resumed = _start(_train_args(run_dir, "--resume"), env, str(tmp_path / "resumed"))
    [(rc, _)] = _wait([resumed])
    assert rc == 0, _stderr(resumed)[-3000:]
    assert _epochs_and_phases(run_dir) == [(e, p) for e in range(EPOCHS) for p in PHASES]


def test_rewrite_metrics_cuts_back_atomically_and_drops_a_torn_line(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"epoch": e, "phase": p, "metrics": {}}) + "\n" for e in range(3) for p in ("train", "val")]
    with open(path, "w") as f:
        f.writelines(lines[:4] + ['{"epoch": 2, "pha'])  # killed mid-append in epoch 2
    failing = str(tmp_path / "failing.jsonl")
    shutil.copy(path, failing)

    def broken_replace(*args):
        raise OSError("disk gone")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk gone"):
            _rewrite_metrics(failing, upto_epoch=0)
    assert open(failing).read() == "".join(lines[:4]) + '{"epoch": 2, "pha'  # untouched
    assert sorted(os.listdir(tmp_path)) == ["failing.jsonl", "metrics.jsonl"]  # no temporary file left
    _rewrite_metrics(path, upto_epoch=1)
    assert open(path).read() == "".join(lines[:4])
    _rewrite_metrics(path, upto_epoch=0)
    assert open(path).read() == "".join(lines[:2])


def test_resume_completes_a_best_save_interrupted_after_latest(tmp_path):
    """Killed between an improved epoch's ``latest`` and ``best`` saves: ``best`` is completed on resume."""
    import jax.numpy as jnp

    run_dir = str(tmp_path)
    states = [{"w": jnp.full((3,), float(e))} for e in range(2)]
    metas = [{"epoch": e, "best_epoch": e} for e in range(2)]
    ckpt = Checkpoints(run_dir)
    ckpt.save(ckpt.latest, 0, states[0], metas[0])
    ckpt.save(ckpt.best, 0, states[0], metas[0])
    ckpt.save(ckpt.latest, 1, states[1], metas[1])  # ... and no best save: the process died here
    ckpt.close()

    ckpt = Checkpoints(run_dir)
    state, meta = ckpt.resume(states[0], log=lambda line: None)
    assert meta == metas[1] and ckpt.best.latest_step() == 1
    best, _ = ckpt.restore(ckpt.best, states[0])
    ckpt.close()
    chex.assert_trees_all_equal(best, states[1])
    chex.assert_trees_all_equal(state, states[1])


def test_a_checkpoint_from_before_the_flat_optimiser_view_restores_converted(tmp_path, tiny):
    """Checkpoints written before steps.optimizer_view hold MultiSteps' accumulator as parameter trees.

    Restoring one, in the process that wrote it or in a fresh read-only one, gives today's state (the
    accumulator as flat group vectors) with every value kept; the layout is read from the checkpoint's tree
    metadata. A checkpoint mismatched in anything else is still refused.
    """
    import jax
    import jax.numpy as jnp

    state = jax.device_get(tiny.state)
    multi = state.opt_state.inner_state
    acc = {k: jax.random.normal(jax.random.PRNGKey(i), v.shape) for i, (k, v) in enumerate(multi.acc_grads.items())}
    state = state.replace(opt_state=state.opt_state._replace(inner_state=multi._replace(acc_grads=acc)))
    legacy = with_tree_accumulator(state)
    assert len(jax.tree_util.tree_leaves(legacy.opt_state)) > len(jax.tree_util.tree_leaves(state.opt_state))

    ckpt = Checkpoints(str(tmp_path))
    ckpt.save(ckpt.latest, 3, legacy, {"epoch": 3, "best_epoch": 3})
    restored, meta = ckpt.restore(ckpt.latest, state)
    assert meta == {"epoch": 3, "best_epoch": 3}
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    reader = Checkpoints(str(tmp_path), create=False)  # as a later process (evaluate, resume) opens it
    chex.assert_trees_all_equal(jax.device_get(reader.restore(reader.latest, state)[0]), jax.device_get(state))
    reader.close()
    other = state.replace(log_vars={**state.log_vars, "extra": jnp.float32(0.0)})
    with pytest.raises(ValueError, match="log_vars"):
        ckpt.restore(ckpt.latest, other)
    ckpt.close()
