"""Test set-up: four host CPU devices for the multi-device tests, fast compiles, one shared trained run folder.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax; pytest loads conftest.py first.
"""

import os

import pytest

_FLAGS = (
    "--xla_force_host_platform_device_count=4",
    # Tests are dominated by XLA:CPU compile time (the step functions are large graphs
    # with tiny data); LLVM optimisation level 0 compiles about 2.5x faster and runs
    # slower, which is the right trade here. Benchmarks and the CLI keep the default.
    "--xla_backend_optimization_level=0",
    # XLA:CPU's older loop emitters compile the tiny train step in about 60 % of the time its fusion
    # emitters take (measured: 13.9 s against 23.5 s); tests want compile speed, not step speed.
    "--xla_cpu_use_fusion_emitters=false",
)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off in tests (no writes under ~/.cache, no process-wide
# cache set by one in-process `main` call); tests/test_compilation_cache.py switches it on where it checks it.
os.environ.setdefault("HAN_JAX_COMPILATION_CACHE", "off")


@pytest.fixture(scope="session")
def tiny():
    """The tiny specification, its compiled steps, a batch and a state (``tests.helpers.tiny``)."""
    from tests.helpers import tiny

    return tiny()


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """``han-jax train --preset tiny --epochs TINY_EPOCHS`` (``tests.helpers.tiny_config``): one run folder
    shared by the CLI, run-folder and prediction tests, read-only to them; training once keeps the suite fast."""
    from han_jax.cli import main
    from tests.helpers import TINY_EPOCHS

    run_dir = str(tmp_path_factory.mktemp("tiny_run"))
    assert main(["train", "--preset", "tiny", "--epochs", str(TINY_EPOCHS), "--run-dir", run_dir, "--quiet"]) == 0
    return run_dir


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no map limit to watch
        return 0


# Linux's default vm.max_map_count; drop compiled code well before a process reaches it.
_MAP_LIMIT = 65_530
_MAP_HEADROOM = 0.5


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Drop every compiled executable when the process holds too many memory maps.

    XLA:CPU maps each executable's code into the process. A whole-suite run
    compiles thousands of step functions: measured on a CI-sized run, the
    process's maps grew to 48,244 (of Linux's default limit of 65,530) inside
    one module, and an earlier run died with SIGSEGV in
    ``backend_compile_and_load`` once past the limit. Clearing only when the
    count passes half the limit keeps the compiles that tests in a module share.
    """
    yield
    if _mapped_regions() > _MAP_HEADROOM * _MAP_LIMIT:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
