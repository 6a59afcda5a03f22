"""JAX's persistent compilation cache for the command line.

Every ``han-jax train``, ``evaluate`` and ``predict`` compiles its step
functions with XLA before the first step (about a minute for the default model
on 2 CPU cores). With the cache on, a later start of the same configuration
loads those executables from disk instead. The cache folder is, in order:
``--compilation-cache DIR``; the environment variable
``HAN_JAX_COMPILATION_CACHE`` (``off`` switches it off); else
``$XDG_CACHE_HOME/han-jax/xla`` (``~/.cache/han-jax/xla``).
``--no-compilation-cache`` switches it off for one command, and a
``JAX_COMPILATION_CACHE_DIR`` the user set for JAX itself is left in charge.
The folder may be deleted at any time; JAX keys each entry by the program,
the backend and the XLA flags, so a stale entry is never used.
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "HAN_JAX_COMPILATION_CACHE"
_OFF = ("", "off", "none", "0", "false")


def default_cache_dir() -> Optional[str]:
    """The cache folder when no flag names one (None: switched off by ``HAN_JAX_COMPILATION_CACHE=off``)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "han-jax", "xla")


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
    """Points JAX's persistent cache at ``path`` (None: leaves it off); returns the folder in use, or None.

    Call before the first compilation: JAX opens its cache once per process.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise FileNotFoundError(f"--compilation-cache {path}: cannot create the folder ({e.strerror}); "
                                "expected a writable folder, or --no-compilation-cache") from None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
