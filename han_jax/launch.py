"""The ``han-jax`` command's process: it chooses the heap (:mod:`han_jax.core.allocator`), then runs the CLI.

An allocator can only be preloaded when a process starts, so where ``HAN_JAX_MALLOC`` asks for one (by
default tcmalloc, where it is installed) the command re-executes itself with it in ``LD_PRELOAD``: the
same process id and arguments, before JAX or anything else heavy has been imported (``han_jax``'s own
names load on first use for this reason). ``python -m han_jax.cli`` runs the CLI without this step.
"""

from __future__ import annotations

import os
import sys

from han_jax.core import allocator


def main() -> int:
    env = allocator.preload_environment()
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "han_jax.cli", *sys.argv[1:]], env)
    # Imported only now, and only when no re-execution replaced this process: importing the CLI imports JAX.
    from han_jax.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
