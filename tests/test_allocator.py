"""The heap settings applied at ``import han_jax``: a large block freed by a worker thread is kept for
its next allocation (no page faults), unless the user or the environment says to leave the heap alone.

Each case is a fresh interpreter: the settings must be in place before any thread allocates.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from han_jax.core import allocator

# A worker thread allocates, touches and frees a block larger than glibc's largest mmap threshold (32 MiB),
# three times; the faults of the second and third rounds are what a step pays on each call.
_PROBE = r"""
import ctypes, json, resource, threading
import han_jax
from han_jax.core import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 64 << 20
faults = []
def rounds():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps({"allocator": allocator.configure(), "faults": faults}))
"""

PAGES = (64 << 20) // 4096


def _probe(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**json.loads(proc.stdout.splitlines()[-1]), "stderr": proc.stderr}


glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="the probe calls glibc")


@pytest.mark.integration
@glibc_linux
def test_a_freed_block_is_kept_for_the_next_step_by_default():
    r = _probe({allocator.ENV: allocator.AUTO})  # auto in a process that was not started with a preload
    assert r["allocator"] == "glibc settings"
    assert r["faults"][0] >= PAGES * 0.9  # the first touch of the memory always faults
    assert max(r["faults"][1:]) < PAGES * 0.05, r["faults"]


@pytest.mark.integration
@glibc_linux
def test_system_leaves_glibc_as_it_is_and_every_round_faults_again():
    r = _probe({allocator.ENV: "system"})
    assert r["allocator"] == "system (HAN_JAX_MALLOC=system)"
    assert min(r["faults"]) >= PAGES * 0.9, r["faults"]


@pytest.mark.integration
@glibc_linux
@pytest.mark.parametrize("env, expected", [
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "system (GLIBC_TUNABLES)"),
    ({allocator.ENV: "fast"}, "system (HAN_JAX_MALLOC='fast' unknown)"),
])
def test_the_users_own_setting_wins_and_an_unknown_one_is_reported(env, expected):
    r = _probe(env)
    assert r["allocator"] == expected
    if allocator.ENV in env:
        assert r["stderr"].strip() == ("han-jax: HAN_JAX_MALLOC='fast': expected one of auto, glibc, tcmalloc, "
                                       "jemalloc, system; leaving the heap as it is")


def _found(*names):
    return lambda name: f"lib{name}.so.4" if name in names else None


@pytest.mark.parametrize("env, installed, expected", [
    ({}, ("tcmalloc_minimal",), {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}),
    ({"LD_PRELOAD": "libmine.so"}, ("tcmalloc_minimal",), {"LD_PRELOAD": "libtcmalloc_minimal.so.4 libmine.so"}),
    ({allocator.ENV: "jemalloc"}, ("jemalloc", "tcmalloc_minimal"),
     {"LD_PRELOAD": "libjemalloc.so.4", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    ({allocator.ENV: "jemalloc", "MALLOC_CONF": "narenas:2"}, ("jemalloc",),
     {"LD_PRELOAD": "libjemalloc.so.4", "MALLOC_CONF": "narenas:2"}),  # the user's own setting wins
    ({}, (), None),  # auto without tcmalloc: glibc's settings, in this process
    ({allocator.ENV: "glibc"}, ("tcmalloc_minimal",), None),
    ({allocator.ENV: "system"}, ("tcmalloc_minimal",), None),
    ({"LD_PRELOAD": "/opt/libtcmalloc.so"}, ("tcmalloc_minimal",), None),  # preloaded: the re-executed process
])
def test_the_command_preloads_the_allocator_asked_for_where_installed(monkeypatch, env, installed, expected):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes.util, "find_library", _found(*installed))
    out = allocator.preload_environment(env)
    if expected is None:
        assert out is None
    else:
        assert {k: out[k] for k in expected} == expected and {k: out[k] for k in env if k not in expected} == {
            k: v for k, v in env.items() if k not in expected}


def test_an_allocator_asked_for_but_missing_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes.util, "find_library", _found())
    assert allocator.preload_environment({allocator.ENV: "tcmalloc"}) is None
    assert capsys.readouterr().err == ("han-jax: HAN_JAX_MALLOC=tcmalloc: libtcmalloc_minimal is not installed; "
                                       "using glibc's settings instead\n")


@pytest.mark.integration
@pytest.mark.skipif(allocator.preload_environment({}) is None, reason="no tcmalloc installed to preload")
def test_the_command_re_executes_itself_with_tcmalloc(tmp_path):
    """Same process id, tcmalloc mapped; killed once seen (what it would train does not matter here)."""
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD")}
    proc = subprocess.Popen([sys.executable, "-m", "han_jax.launch", "train", "--preset", "tiny", "--quiet",
                             "--run-dir", str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "tcmalloc" not in open(f"/proc/{proc.pid}/maps").read():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert "LD_PRELOAD=" in open(f"/proc/{proc.pid}/environ").read().replace("\0", "\n")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
