"""The CLI's persistent compilation cache: where it lives, how it is switched off, and that a warm start
(executables loaded from the cache) gives the same numbers as the cold one that filled it."""

import json
import os
import subprocess
import sys

import pytest

from han_jax.compilation_cache import ENV, default_cache_dir, enable_compilation_cache


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "han-jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "han-jax" / "xla")
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    for off in ("off", "OFF", "", "0", "none"):
        monkeypatch.setenv(ENV, off)
        assert default_cache_dir() is None


def test_off_leaves_jax_alone_and_a_user_set_jax_folder_wins(monkeypatch, tmp_path):
    import jax

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
    assert enable_compilation_cache(str(tmp_path / "ours")) == str(tmp_path / "jax_own")
    assert not (tmp_path / "ours").exists()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="--compilation-cache .*a_file/xla: cannot create the folder"):
        enable_compilation_cache(str(tmp_path / "a_file" / "xla"))


def _evaluate(run_dir, out, *flags, env):
    proc = subprocess.run([sys.executable, "-m", "han_jax.cli", "evaluate", "--run-dir", run_dir, "--out", out,
                           *flags], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.load(open(out))


def test_a_warm_start_loads_the_cached_steps_and_gives_the_same_numbers(tiny_run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[ENV] = str(tmp_path / "unused")  # the flag wins over the environment
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny steps may compile in under JAX's 1 s floor
    cache = tmp_path / "cache"
    cold = _evaluate(tiny_run_dir, str(tmp_path / "cold.json"), "--compilation-cache", str(cache), env=env)
    entries = set(os.listdir(cache))
    assert entries, "the cold start wrote no compiled step into the cache"
    warm = _evaluate(tiny_run_dir, str(tmp_path / "warm.json"), "--compilation-cache", str(cache), env=env)
    assert warm == cold
    assert not (tmp_path / "unused").exists()
    # Off for one command: nothing is written where the environment points.
    env[ENV] = str(tmp_path / "env_cache")
    off = _evaluate(tiny_run_dir, str(tmp_path / "off.json"), "--no-compilation-cache", env=env)
    assert off == cold and not (tmp_path / "env_cache").exists()
