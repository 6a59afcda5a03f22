"""Several processes on JAX's own runtime: 2 processes on localhost == 2 devices in 1 process == 1 device.

Each process is ``han-jax train`` as a user starts it (one CPU device each, gloo
collectives); the reference runs are the shared 1-device tiny run
(``tiny_run_dir``) and a 1-process run on 2 host devices. The 2-process run is
stopped after its second epoch and resumed by both processes, so a multi-process
``--resume`` is part of what is compared.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from han_jax.cli import main
from han_jax.training.distributed import DistributedStartError, cluster_detected, start_distributed
from tests.helpers import TINY_EPOCHS

# After TINY_EPOCHS epochs (57 Adam updates). Summation order differs between 1 device, 2 devices in one
# process and gloo's all-reduce across 2 processes: measured, the metrics differ by at most 3e-6 relative.
# Parameters get the one-step tolerance of the pmap test (tests/test_steps.py) widened for 57 steps: biases
# with an exactly-zero true gradient (attention key biases) take Adam-normalised steps of float noise, which
# add up to 3.5e-4 (measured; every other parameter is within 1.5e-4).
METRIC_TOLERANCE = {"rtol": 2e-5, "atol": 1e-6}
PARAM_TOLERANCE = {"rtol": 1e-3, "atol": 5e-4}
TIMING_KEYS = {"samples_per_second"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    """The test's environment for a child process, with one CPU device per process (JAX's default)."""
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    return env


def _launch(args, n: int = 2, port=None, env=None, timeout=900):
    """``han-jax train ARGS`` as processes 0..n-1 of one run; returns their CompletedProcess-like results."""
    port = _free_port() if port is None else port
    procs = [subprocess.Popen([sys.executable, "-m", "han_jax.cli", "train", *args,
                               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i)], env=env or _env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _numbers(metrics: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in metrics.items() if v is not None and k not in TIMING_KEYS}


def _params(run_dir):
    from han_jax.app.runs import load_run

    return jax.device_get(load_run(run_dir, "best").state.params)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("two_process"))
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    args = ["--preset", "tiny", "--epochs", str(TINY_EPOCHS), "--run-dir", run_dir, "--quiet"]
    # The resumed half loads the first half's compiled steps from a persistent cache.
    env = _env(HAN_JAX_COMPILATION_CACHE=cache)
    first = _launch(args + ["--stop-after-epoch", "1"], env=env)
    for rc, _, stderr in first:
        assert rc == 0, stderr[-3000:]
    start = time.perf_counter()
    second = _launch(args + ["--resume"], env=env)
    for rc, _, stderr in second:
        assert rc == 0, stderr[-3000:]
    return run_dir, first, second, time.perf_counter() - start


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("two_device"))
    assert main(["train", "--preset", "tiny", "--epochs", str(TINY_EPOCHS), "--run-dir", run_dir, "--quiet",
                 "--devices", "2"]) == 0
    return run_dir


@pytest.mark.integration
def test_two_processes_equal_two_devices_and_one_device(two_process_run, two_device_run, tiny_run_dir):
    run_dir, first, second, _ = two_process_run
    (_, out0, _), (_, out1, _) = first
    assert "devices 2 (sharded over 2 processes)" in out0
    # Process 1 reports nothing (process 0 reports for the run); gloo's own connection line is all it prints.
    assert "model:" not in out1 and "Final metrics" not in out1 and "Epoch" not in out1
    assert "resumed from epoch 1" in second[0][1]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["train"]["num_devices"] == 2 and config["train"]["parallel"] == "sharded"
    rows = _rows(run_dir)
    # Every epoch and phase once (process 0 alone writes), resumed seamlessly.
    assert [(r["epoch"], r["phase"]) for r in rows] == [(r["epoch"], r["phase"]) for r in _rows(tiny_run_dir)]
    for reference in (two_device_run, tiny_run_dir):
        for got, want in zip(rows, _rows(reference)):
            chex.assert_trees_all_close(_numbers(got["metrics"]), _numbers(want["metrics"]), **METRIC_TOLERANCE)
        summary, want_summary = (json.load(open(os.path.join(d, "summary.json"))) for d in (run_dir, reference))
        assert summary["best_epoch"] == want_summary["best_epoch"]
        for split in ("train", "val", "test"):
            chex.assert_trees_all_close(_numbers(summary["final"][split]), _numbers(want_summary["final"][split]),
                                        **METRIC_TOLERANCE)
        chex.assert_trees_all_close(_params(run_dir), _params(reference), **PARAM_TOLERANCE)


def _fails(args, n=1, timeout=120, **kw):
    """Processes that must end with exit status 2 and one error line."""
    start = time.perf_counter()
    results = _launch(args, n=n, timeout=timeout, **kw)
    for rc, _, stderr in results:
        assert rc == 2, stderr[-2000:]
        assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr[-2000:]
    return results, time.perf_counter() - start


@pytest.mark.parametrize("environ, expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "1"}, True), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"SLURM_NTASKS": "x"}, False)])
def test_a_multi_task_cluster_job_is_detected(environ, expected):
    assert cluster_detected(environ) is expected


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "h:1", "num_processes": 2}, "--process-id: expected with the other distributed flags"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0},
     "--coordinator-address='h': expected HOST:PORT"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "--num-processes=0: expected an integer"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, "--process-id=-1: expected 0..1"),
    ({"timeout_s": 0}, "--distributed-timeout=0: expected whole seconds >= 1")])
def test_distributed_arguments_are_checked_before_anything_starts(kwargs, message):
    with pytest.raises(DistributedStartError, match=re.escape(message)):
        start_distributed(**kwargs)
    assert not jax.distributed.is_initialized()


@pytest.mark.integration
def test_a_wrong_process_id_is_refused_before_the_runtime_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "han_jax.cli", "train", "--preset", "tiny", "--run-dir",
                           str(tmp_path / "r"), "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                           "--process-id", "2"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--process-id=2: expected 0..1" in proc.stderr
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.integration
def test_a_coordinator_that_never_answers_times_out_naming_its_address(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "han_jax.cli", "train", "--preset", "tiny", "--run-dir",
                           str(tmp_path / "r"), "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                           "2", "--process-id", "1", "--distributed-timeout", "3"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"coordinator 127.0.0.1:{port} did not answer within 3 s (process 1 of 2)" in proc.stderr


@pytest.mark.integration
def test_a_process_whose_peers_never_join_times_out(tmp_path):
    port = _free_port()
    proc = subprocess.run([sys.executable, "-m", "han_jax.cli", "train", "--preset", "tiny", "--run-dir",
                           str(tmp_path / "r"), "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                           "2", "--process-id", "0", "--distributed-timeout", "3"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"did not start within 3 s (process 0 of 2, coordinator 127.0.0.1:{port}): not every process joined"
            in proc.stderr)
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.integration
def test_a_global_batch_the_devices_cannot_share_is_refused(tmp_path):
    results, _ = _fails(["--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--batch-size", "3"], n=2)
    for _, _, stderr in results:
        assert "train.batch_size=3: expected a multiple of the 2 devices of the 2 processes" in stderr
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.integration
def test_pmap_is_refused_across_processes(tmp_path):
    results, _ = _fails(["--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--parallel", "pmap"], n=2)
    for _, _, stderr in results:
        assert "train.parallel='pmap' with 2 processes: expected 'sharded'" in stderr
    assert not os.path.exists(tmp_path / "r")
