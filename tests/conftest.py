"""Test set-up: four host CPU devices for the pmap tests, fast compiles.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax; pytest loads conftest.py first.
"""

import os

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
