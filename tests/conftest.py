"""Test set-up: four host CPU devices for the pmap tests.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax; pytest loads conftest.py first.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
