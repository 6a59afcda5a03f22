"""The CLI's persistent compilation cache: where it lives, how it is switched off, and that a warm start
(executables loaded from the cache) gives the same numbers as the cold one that filled it."""

import json
import os
import subprocess
import sys

import pytest

from han_jax.training.compilation_cache import ENV, default_cache_dir, enable_compilation_cache, stored_entries


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

    from han_jax.training import compilation_cache

    monkeypatch.setattr(compilation_cache, "_executable_dir", None)  # restored for the tests after this one
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert compilation_cache._executable_dir is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
    assert enable_compilation_cache(str(tmp_path / "ours")) == str(tmp_path / "jax_own")
    assert not (tmp_path / "ours").exists()
    assert compilation_cache._executable_dir == str(tmp_path / "jax_own" / "executables")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="--compilation-cache .*a_file/xla: cannot create the folder"):
        enable_compilation_cache(str(tmp_path / "a_file" / "xla"))


def _evaluate(run_dir, out, *flags, env):
    proc = subprocess.run([sys.executable, "-m", "han_jax.cli", "evaluate", "--run-dir", run_dir, "--out", out,
                           *flags], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.load(open(out))


@pytest.mark.integration
def test_a_warm_start_loads_the_cached_steps_and_gives_the_same_numbers(tiny_run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[ENV] = str(tmp_path / "unused")  # the flag wins over the environment
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny steps may compile in under JAX's 1 s floor
    cache = tmp_path / "cache"
    cold = _evaluate(tiny_run_dir, str(tmp_path / "cold.json"), "--compilation-cache", str(cache), env=env)
    entries = set(os.listdir(cache))
    assert entries, "the cold start wrote no compiled step into the cache"
    stored = sorted(name.split("-")[0] for name in stored_entries(cache / "executables"))
    assert stored == ["test_step"], stored  # evaluate scores every split with test_step
    before = {name: os.stat(cache / "executables" / name).st_mtime_ns for name in stored_entries(cache / "executables")}
    warm = _evaluate(tiny_run_dir, str(tmp_path / "warm.json"), "--compilation-cache", str(cache), env=env)
    assert warm == cold
    # Loaded, not compiled and rewritten.
    assert {name: os.stat(cache / "executables" / name).st_mtime_ns for name in before} == before
    assert not (tmp_path / "unused").exists()
    # Off for one command: nothing is written where the environment points.
    env[ENV] = str(tmp_path / "env_cache")
    off = _evaluate(tiny_run_dir, str(tmp_path / "off.json"), "--no-compilation-cache", env=env)
    assert off == cold and not (tmp_path / "env_cache").exists()


# -- compiled executables stored across processes (persistent) -----------------------------------------------

def _counted():
    """A jitted function that counts its traces, wrapped as a fresh process would wrap it."""
    import jax
    import jax.numpy as jnp

    traces = []

    def f(x, y):
        traces.append(1)
        return {"sum": (x * y).sum(), "scaled": jnp.tanh(x) * 2.0}

    return jax.jit(f), traces


@pytest.fixture
def executable_dir(tmp_path):
    from han_jax.training import compilation_cache

    folder = str(tmp_path / "executables")
    compilation_cache.set_executable_dir(folder)
    yield folder
    compilation_cache.set_executable_dir(None)


def test_a_stored_executable_is_loaded_without_tracing_and_gives_the_same_numbers(executable_dir):
    import chex
    import jax.numpy as jnp

    from han_jax.training.compilation_cache import persistent

    x, y = jnp.arange(12.0).reshape(3, 4), jnp.full((3, 4), 0.5)
    jitted, traces = _counted()
    first = persistent(jitted, "toy", ("config", 1))(x, y)
    assert len(traces) == 1
    entries = stored_entries(executable_dir)
    assert len(entries) == 1 and entries[0].startswith("toy-") and entries[0].endswith(".jaxexe")
    jitted, traces = _counted()  # a new process: new function objects, the same folder
    again = persistent(jitted, "toy", ("config", 1))
    chex.assert_trees_all_close(again(x, y), first, rtol=0, atol=0)
    assert traces == [], "the stored executable was traced again"
    assert again(x, y)["sum"] == first["sum"] and traces == []
    # Another shape, key or name is another program: compiled and stored beside the first.
    again(x[:2], y[:2])
    assert len(traces) == 1
    for name, key in (("toy", ("config", 2)), ("other", ("config", 1))):
        jitted, traces = _counted()
        persistent(jitted, name, key)(x, y)
        assert len(traces) == 1, (name, key)
    assert len(stored_entries(executable_dir)) == 4


def test_python_scalars_are_one_signature_whatever_their_value(executable_dir):
    import jax
    import jax.numpy as jnp

    from han_jax.training.compilation_cache import persistent

    wrapped = persistent(jax.jit(lambda x, epoch: x * epoch), "toy", "k")
    assert [float(wrapped(jnp.float32(2.0), epoch)) for epoch in (1, 2, 3)] == [2.0, 4.0, 6.0]
    assert len(stored_entries(executable_dir)) == 1 and len(wrapped._compiled) == 1


def test_a_broken_entry_is_reported_and_rebuilt(executable_dir, capsys):
    import chex
    import jax.numpy as jnp

    from han_jax.training.compilation_cache import persistent

    x = jnp.ones((2, 3))
    jitted, _ = _counted()
    expected = persistent(jitted, "toy", "k")(x, x)
    (entry,) = stored_entries(executable_dir)
    path = os.path.join(executable_dir, entry)
    with open(path, "r+b") as f:
        f.truncate(100)
    jitted, traces = _counted()
    chex.assert_trees_all_close(persistent(jitted, "toy", "k")(x, x), expected)
    assert len(traces) == 1
    err = capsys.readouterr().err
    assert f"compiled executable {path} could not be loaded" in err and "compiling it again" in err
    assert os.path.getsize(path) > 100 and stored_entries(executable_dir) == [entry]  # rewritten whole


def test_without_a_folder_or_inside_a_trace_it_is_plain_jit(tmp_path):
    import jax
    import jax.numpy as jnp

    from han_jax.training import compilation_cache
    from han_jax.training.compilation_cache import persistent

    x = jnp.ones((2, 3))
    jitted, traces = _counted()
    wrapped = persistent(jitted, "toy", "k")
    assert wrapped(x, x)["sum"] == 6.0 and len(traces) == 1
    compilation_cache.set_executable_dir(str(tmp_path / "executables"))
    try:
        shapes = jax.eval_shape(wrapped, x, x)
        assert shapes["scaled"].shape == (2, 3)
        assert jax.jit(lambda a: wrapped(a, a)["sum"])(x) == 6.0
    finally:
        compilation_cache.set_executable_dir(None)
    assert not (tmp_path / "executables").exists()


def test_an_edited_source_file_changes_every_key(monkeypatch):
    from han_jax.training import compilation_cache

    before = compilation_cache._environment()
    compilation_cache.source_fingerprint.cache_clear()
    monkeypatch.setattr(compilation_cache, "source_fingerprint", lambda: "edited")
    assert compilation_cache._environment() != before
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert compilation_cache._environment()[5] != before[5]


def test_prefetch_loads_in_the_background_what_the_first_call_then_uses(executable_dir):
    import chex
    import jax.numpy as jnp

    from han_jax.training.compilation_cache import persistent, prefetch

    x = jnp.ones((2, 3))
    jitted, _ = _counted()
    expected = persistent(jitted, "toy", "k")(x, x)
    persistent(jitted, "toy", "k")(x[:1], x[:1])  # two signatures stored
    jitted, traces = _counted()
    fresh = persistent(jitted, "toy", "k")
    prefetch(fresh, jitted, persistent(jitted, "other", "k"))  # plain functions and other names: nothing
    assert len(fresh._prefetched) == 2
    chex.assert_trees_all_close(fresh(x, x), expected, rtol=0, atol=0)
    assert traces == [] and len(fresh._prefetched) == 1  # used, not loaded twice


def test_without_store_runs_when_nothing_is_stored(executable_dir):
    import jax
    import jax.numpy as jnp

    from han_jax.training import compilation_cache
    from han_jax.training.compilation_cache import persistent

    calls = []

    def eager(x):
        calls.append(1)
        return x + 1

    wrapped = persistent(jax.jit(lambda x: x + 1), "toy", "k", without_store=eager)
    assert float(wrapped(jnp.float32(1.0))) == 2.0 and calls == [] and stored_entries(executable_dir)
    compilation_cache.set_executable_dir(None)
    assert float(wrapped(jnp.float32(1.0))) == 2.0 and calls == [1]


_TOY_START = """
import os, sys
from han_jax.training import compilation_cache
compilation_cache.enable_compilation_cache(sys.argv[2])
if sys.argv[1] == "jax-only":
    compilation_cache.set_executable_dir(None)
import jax, jax.numpy as jnp
from han_jax.training.compilation_cache import persistent
def f(x, y):
    return {"a": jnp.tanh(x) @ y.T, "b": jnp.broadcast_to(x.sum(), (3, 7)) * 2}
out = persistent(jax.jit(f), "toy", "k")(jnp.ones((5, 4)), jnp.full((6, 4), 0.5))
print(float(out["a"].sum()), float(out["b"].sum()))
"""


@pytest.mark.integration
def test_an_entry_stored_after_a_hit_in_jax_own_cache_runs_in_a_new_process(tmp_path):
    # Where JAX's cache already holds the program, serialising what it loaded stored an entry that failed at
    # its first run in the next process ("Function wrapped_tanh not found"): stored functions compile fresh.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    outputs = []
    for stage in ("jax-only", "store", "load"):
        proc = subprocess.run([sys.executable, "-c", _TOY_START, stage, str(tmp_path / "xla")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-1500:]}"
        outputs.append(proc.stdout.split())
        if stage == "jax-only":
            assert any(name.startswith("jit_f-") for name in os.listdir(tmp_path / "xla"))
    assert outputs[0] == outputs[1] == outputs[2] == ["45.695655822753906", "840.0"]
    assert len(stored_entries(tmp_path / "xla" / "executables")) == 1


def test_runs_that_differ_only_in_loop_data_or_schedule_share_a_cache_entry(tiny, executable_dir):
    """The persistent key is the step's specification: another epoch count, data window or learning rate hits."""
    import dataclasses

    from han_jax.training.devices import SingleDevice
    from han_jax.training.spec import StepSpec

    config = tiny.config
    other = config.replace(train=dataclasses.replace(config.train, epochs=50, patience=4),
                           data=dataclasses.replace(config.data, end_date="2022-11-30"),
                           step=dataclasses.replace(config.step, optim=dataclasses.replace(
                               config.step.optim, learning_rate=0.01, warmup_epochs=4)))
    compiled = SingleDevice().compiled(StepSpec.of(other, tiny.resolved))
    assert compiled.train._prefix() == tiny.steps.compiled.train._prefix()
    narrower = config.replace(model=dataclasses.replace(config.model, d_model=8))
    assert SingleDevice().compiled(StepSpec.of(narrower, tiny.resolved)).train._prefix() != compiled.train._prefix()
