"""Test set-up: four host CPU devices for the pmap tests, fast compiles, one shared trained run folder.

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
)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """``han-jax train --preset tiny --epochs TINY_EPOCHS`` (``tests.helpers.tiny_config``): one run folder
    shared by the CLI, run-folder and prediction tests, read-only to them; training once keeps the suite fast."""
    from han_jax.cli import main
    from tests.helpers import TINY_EPOCHS

    run_dir = str(tmp_path_factory.mktemp("tiny_run"))
    assert main(["train", "--preset", "tiny", "--epochs", str(TINY_EPOCHS), "--run-dir", run_dir, "--quiet"]) == 0
    return run_dir


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module.

    XLA:CPU maps each executable's code into the process; a whole-suite run
    compiles thousands of step functions, and one process crashed inside an XLA
    compile (SIGSEGV in ``backend_compile_and_load``) 85 % of the way through the
    suite, a symptom of exhausting the kernel's map limit (``vm.max_map_count``,
    65,530 here). Modules do not share compiled functions, so this costs little.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
