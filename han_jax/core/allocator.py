"""The C heap under a step: a step's large buffer is kept between steps instead of page-faulting in again.

XLA:CPU packs a step's temporaries into one large buffer (1.57 GiB for the default train step) that its
worker threads allocate and free on every call. glibc, left as it is, serves those threads from mmap'd
per-thread heaps and any block that large with its own ``mmap``, so the buffer is unmapped when freed and
every page faults in again on the next step: about 415,000 minor faults and over a second of system time
per default train step on 2 cores (``benchmarks/bench_allocator.py``, ``benchmarks/README.md``).

Two remedies, both measured there:

* **glibc's own settings**, applied by :func:`configure` when :mod:`han_jax` is imported, before JAX starts
  its threads (a thread picks its arena at its first allocation): ``M_ARENA_MAX=1`` (every thread
  allocates from the main heap, which grows in place), ``M_MMAP_MAX=0`` (no block gets a mapping of its
  own; a failed ``brk`` still falls back to mmap) and ``M_TRIM_THRESHOLD=-1`` (freed memory stays for the
  next step). They are the ``GLIBC_TUNABLES`` ``glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
  glibc.malloc.trim_threshold=...`` applied in-process, so a stock machine needs nothing installed. The
  cost: a process keeps its peak heap until it exits.
* **tcmalloc**, faster still on the same step (and with a lower peak), but it must be loaded when the
  process starts: the ``han-jax`` command (:mod:`han_jax.launch`) re-executes itself with it in
  ``LD_PRELOAD`` when it is installed (:func:`preload_environment`). A library user can start Python
  the same way.

``HAN_JAX_MALLOC`` chooses: ``auto`` (the default: tcmalloc for the command where installed, else glibc's
settings), ``glibc`` (glibc's settings), ``tcmalloc`` or ``jemalloc`` (preloaded by the command; glibc's
settings where the library is missing, with a line saying so), ``system`` (the heap as the C library
has it). Your own ``GLIBC_TUNABLES`` malloc settings or an allocator already in ``LD_PRELOAD`` are
left in charge.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Mapping, Optional

ENV = "HAN_JAX_MALLOC"
AUTO, GLIBC, TCMALLOC, JEMALLOC, SYSTEM = "auto", "glibc", "tcmalloc", "jemalloc", "system"
CHOICES = (AUTO, GLIBC, TCMALLOC, JEMALLOC, SYSTEM)

# The allocators a command may preload, by the names ctypes.util.find_library knows them by.
_LIBRARIES = {TCMALLOC: ("tcmalloc_minimal", "tcmalloc"), JEMALLOC: ("jemalloc",)}
# jemalloc returns freed pages to the system after a delay by default: the buffer would fault in again.
_LIBRARY_ENV = {JEMALLOC: {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}}

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt takes an int, so no
# byte count above 2 GiB could be given, and a larger step's buffer would be trimmed again).
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_applied: Optional[str] = None


def choice(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """``HAN_JAX_MALLOC`` (default ``auto``), or None when it names nothing han-jax knows."""
    value = env.get(ENV, AUTO).strip().lower() or AUTO
    return value if value in CHOICES else None


def preloaded(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The allocator already in ``LD_PRELOAD``, if any."""
    value = env.get("LD_PRELOAD", "")
    return next((name for name in _LIBRARIES if name in value), None)


def configure() -> str:
    """Applies glibc's settings once per process, unless the user, the environment or the platform says not.

    Returns:
      What the process's heap is, for logs and benchmarks: ``"glibc settings"`` (applied here),
      ``"tcmalloc"`` / ``"jemalloc"`` (preloaded), or ``"system (...)"`` with the reason it was left
      as the C library has it.

    An unknown ``HAN_JAX_MALLOC`` is reported in one line on stderr and the heap left alone: this runs
    at import, where an exception would be a traceback.
    """
    global _applied
    if _applied is None:
        _applied = _configure()
    return _applied


def _configure() -> str:
    wanted = choice()
    if wanted is None:
        print(f"han-jax: {ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}; leaving the heap as it is",
              file=sys.stderr)
        return f"system ({ENV}={os.environ[ENV]!r} unknown)"
    if wanted == SYSTEM:
        return f"system ({ENV}=system)"
    if preloaded():
        return preloaded()
    if platform.libc_ver()[0] != "glibc":
        return "system (not glibc)"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "system (GLIBC_TUNABLES)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    refused = [param for param, value in SETTINGS if libc.mallopt(param, value) != 1]
    return "glibc settings" if not refused else f"system (mallopt refused parameters {refused})"


def preload_environment(env: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The environment the ``han-jax`` command re-executes itself with to preload an allocator, or None.

    None when ``HAN_JAX_MALLOC`` is ``glibc``, ``system`` or unknown, when an allocator is already
    preloaded (the re-executed process itself), off Linux, or when ``auto`` finds no tcmalloc. A
    named library that is not installed is reported in one line on stderr; the command then runs with
    glibc's settings.
    """
    wanted = choice(env)
    if wanted not in (AUTO, TCMALLOC, JEMALLOC) or preloaded(env) or not sys.platform.startswith("linux"):
        return None
    library = TCMALLOC if wanted == AUTO else wanted
    found = next(filter(None, map(ctypes.util.find_library, _LIBRARIES[library])), None)
    if found is None:
        if wanted != AUTO:
            print(f"han-jax: {ENV}={wanted}: lib{_LIBRARIES[library][0]} is not installed; using glibc's "
                  "settings instead", file=sys.stderr)
        return None
    out = {**_LIBRARY_ENV.get(library, {}), **env}
    out["LD_PRELOAD"] = " ".join(filter(None, (found, env.get("LD_PRELOAD", ""))))
    return out
