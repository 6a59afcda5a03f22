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

JAX's own cache is keyed by the lowered program, so a warm start still traces
and lowers every step in Python (seconds for the default model's train step)
and traces ``model.init`` again. :func:`persistent` goes one step further for
han-jax's own jitted functions: it stores each compiled executable
(``jax.experimental.serialize_executable``) in ``executables/`` under the same
folder, keyed by everything the program is made from (function name, step
specification, argument shapes, dtypes and shardings, han-jax's source, the JAX
and jaxlib versions, the devices and the XLA flags), and a warm start loads it
without tracing. Entries are
written whole (to a temporary name, then renamed), and one that fails to load
is reported on stderr and compiled again.

Trust: a cache entry is code. JAX's entries are machine code XLA runs, and a stored
executable is a pickle, which runs code as it is read. So the cache is used only in a
folder that belongs to the user and that nobody else may write (a shared or
world-writable folder is refused with one line on stderr, and the command compiles
without a cache); folders are created 0700 and entries 0600. Each stored executable
also carries an HMAC-SHA256 of its bytes under a random per-folder key (``.key``,
0600, owner-only): an entry that does not verify, e.g. one copied from elsewhere or
planted, is never unpickled; it is reported and compiled again.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import pickle
import secrets
import stat
import sys
from typing import Any, Callable, Optional

from han_jax.core.files import atomic_write, open_regular

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
    """Points JAX's persistent cache and :func:`persistent`'s executables at ``path`` (None: off).

    Returns the folder in use, or None.

    Call before the first compilation: JAX opens its cache once per process.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # The user's own setting for JAX's cache is left in charge; han-jax stores executables under it
        # only where that folder is private.
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
        _make_folder(path, "JAX_COMPILATION_CACHE_DIR")
        set_executable_dir(os.path.join(path, EXECUTABLES) if _private_or_warn(path) else None)
        return path
    if path is None:
        set_executable_dir(None)
        return None
    _make_folder(path, "--compilation-cache")
    if not _private_or_warn(path):
        set_executable_dir(None)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    set_executable_dir(os.path.join(path, EXECUTABLES))
    return path


def _make_folder(path: str, source: str) -> None:
    """Creates a cache folder that only its owner may enter (an existing one is checked, not changed)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise FileNotFoundError(f"{source} {path}: cannot create the folder ({e.strerror}); "
                                "expected a writable folder, or --no-compilation-cache") from None


def not_private(path: str) -> Optional[str]:
    """Why ``path`` is not a folder that only the current user can write (None: it is)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_or_warn(path: str) -> bool:
    reason = not_private(path)
    if reason is not None:
        print(f"han-jax: compilation cache {path} is {reason}; expected a folder of yours that only you can "
              "write (its entries are code): compiling without it", file=sys.stderr)
    return reason is None


EXECUTABLES = "executables"
ENTRY_SUFFIX = ".jaxexe"
KEY_FILE = ".key"
_executable_dir: Optional[str] = None


def set_executable_dir(path: Optional[str]) -> None:
    """Where :func:`persistent` stores compiled executables (None: nowhere; every call is plain ``jit``)."""
    global _executable_dir
    _executable_dir = path


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A hash of every han-jax source file: an edited model or step never loads an old executable."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # han_jax/, above training/
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, package).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _environment() -> tuple:
    """What, besides the program, decides the executable XLA builds for it."""
    import jax
    import jaxlib

    devices = jax.local_devices()
    config = jax.config
    return (jax.__version__, jaxlib.__version__, devices[0].client.platform_version,
            tuple((d.platform, d.device_kind, d.id) for d in devices), jax.process_count(),
            os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
            config.jax_enable_x64, str(config.jax_default_matmul_precision), config.jax_default_prng_impl,
            config.jax_threefry_partitionable, source_fingerprint())


def _leaf_signature(leaf) -> tuple:
    import jax

    if isinstance(leaf, jax.Array):
        return (leaf.shape, str(leaf.dtype), leaf.weak_type, str(leaf.sharding) if leaf.committed else "")
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return (tuple(leaf.shape), str(leaf.dtype), False, "host")
    return (type(leaf).__name__,)  # a Python scalar: jit traces it by type (weakly typed), never by value


class PersistentFunction:
    """A ``jax.jit``-ed function whose compiled executables outlive the process (see the module docstring).

    Calls go to the jitted function itself (or to ``without_store``, when given) when no folder is set
    (tests, ``--no-compilation-cache``), in a multi-process run (each process's executable names devices
    of the whole cluster), and inside another trace. Otherwise each distinct argument signature is looked
    up on disk once; a miss is compiled from ``jitted.lower(*args)`` past JAX's own cache (see
    :func:`_compile_past_jax_cache`) and stored. :meth:`prefetch` starts loading the stored executables
    in a background thread, so that a start overlaps loading the train step with creating the state.
    """

    def __init__(self, jitted: Callable, name: str, key: Any, without_store: Optional[Callable] = None):
        self._jitted, self._name, self._key = jitted, name, key
        self._without_store = without_store or jitted
        self._compiled: dict = {}
        self._prefetched: dict = {}

    def __getattr__(self, attr):
        # lower, trace, eval_shape, ...: the jitted function's own.
        return getattr(self._jitted, attr)

    def __call__(self, *args):
        import jax

        folder = _executable_dir
        if folder is None or jax.process_count() > 1:
            return self._without_store(*args)
        leaves, treedef = jax.tree.flatten(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # inside another trace: plain jit
            return self._jitted(*args)
        signature = (treedef, tuple(_leaf_signature(leaf) for leaf in leaves))
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._compiled[signature] = self._load_or_compile(folder, args, signature)
        return compiled(*args)

    def _prefix(self) -> str:
        """The file-name prefix of every executable of this function, configuration and environment."""
        key = repr((self._name, self._key, _environment()))
        return f"{self._name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}-"

    def _path(self, folder: str, signature) -> str:
        key = repr((str(signature[0]), signature[1]))
        return os.path.join(folder, f"{self._prefix()}{hashlib.sha256(key.encode()).hexdigest()[:20]}{ENTRY_SUFFIX}")

    def prefetch(self) -> None:
        """Starts loading this function's stored executables (any argument signature) in the background."""
        import jax

        folder = _executable_dir
        if folder is None or jax.process_count() > 1 or not os.path.isdir(folder):
            return
        prefix = self._prefix()
        for name in stored_entries(folder):
            path = os.path.join(folder, name)
            if name.startswith(prefix) and path not in self._prefetched:
                self._prefetched[path] = _loader().submit(_load, path)

    def _load_or_compile(self, folder: str, args, signature):
        path = self._path(folder, signature)
        future = self._prefetched.pop(path, None)
        loaded = future.result() if future is not None else _load(path) if os.path.exists(path) else None
        if isinstance(loaded, Exception):  # a truncated, foreign or outdated entry: say so, then rebuild it
            print(f"han-jax: compiled executable {path} could not be loaded ({type(loaded).__name__}: "
                  f"{str(loaded)[:200]}); compiling it again", file=sys.stderr)
        elif loaded is not None:
            return loaded
        from jax.experimental import serialize_executable

        compiled = _compile_past_jax_cache(self._jitted.lower(*args))
        try:
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
        except Exception as e:  # e.g. closed-over constants: this function just is not stored
            print(f"han-jax: {self._name} cannot be stored in the executable cache "
                  f"({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
            return compiled
        try:
            signed = _signed(folder, blob)
        except (OSError, ValueError) as e:  # a key that is not private: nothing is stored under it
            print(f"han-jax: {self._name} not stored in the executable cache ({e})", file=sys.stderr)
            return compiled
        _write_whole(path, signed)
        return compiled


def _compile_past_jax_cache(lowered):
    """``lowered.compile()`` without JAX's persistent cache: what is stored must be a fresh compile.

    XLA:CPU does not keep the kernels' object code of an executable that JAX's cache loaded, so serialising
    that one stores an entry that loads but fails at its first run ("Function wrapped_tanh not found";
    ``tests/test_compilation_cache.py`` reproduces it). So a stored function costs a full compile when its
    entry is missing, e.g. the first start after han-jax's source changed, even where JAX's cache holds
    the same program; it is then never written to JAX's cache twice.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether its cache is in use
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


_MAGIC = b"han-jax-executable-1\n"


def stored_entries(folder: str) -> list:
    """The names of the executables stored in ``folder`` (not its key or a file being written), sorted."""
    return sorted(name for name in os.listdir(folder) if name.endswith(ENTRY_SUFFIX))


@functools.lru_cache(maxsize=8)
def _folder_key(folder: str) -> bytes:
    """The folder's HMAC key (``folder/.key``, created on first use); a key others could read is refused."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, KEY_FILE)
    if not os.path.lexists(path):
        # Written whole under a private name, then linked into place: a process starting beside this
        # one reads either no key or the whole key, and the first link wins.
        draft = f"{path}.{os.getpid()}.tmp"
        with os.fdopen(open_regular(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    fd = open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o077:
            raise PermissionError(f"{path}: the cache key must be yours and readable by you only (mode 600)")
        key = f.read()
    if len(key) != 32:
        raise ValueError(f"{path}: not a han-jax cache key")
    return key


def _signed(folder: str, blob: bytes) -> bytes:
    return _MAGIC + hmac.new(_folder_key(folder), blob, hashlib.sha256).digest() + blob


def _verified(path: str) -> bytes:
    """The pickled entry at ``path``, once its HMAC verifies; never unpickled otherwise."""
    fd = open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    n = len(_MAGIC) + hashlib.sha256().digest_size
    if not data.startswith(_MAGIC) or len(data) < n:
        raise ValueError("not a han-jax executable entry")
    mac, blob = data[len(_MAGIC):n], data[n:]
    if not hmac.compare_digest(mac, hmac.new(_folder_key(os.path.dirname(path)), blob, hashlib.sha256).digest()):
        raise ValueError("integrity check failed: not written by your han-jax in this folder; not loaded")
    return blob


def _load(path: str):
    """The executable stored at ``path``, or the exception that stopped it loading."""
    import jax
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree, device_ids = pickle.loads(_verified(path))
        # The devices it was compiled for, not all of the backend's (its default).
        by_id = {d.id: d for d in jax.local_devices()}
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:
        return e


@functools.lru_cache(maxsize=1)
def _loader():
    # One background thread: XLA releases the GIL while it loads, so a load overlaps the caller's own work
    # (the small model's init and train-step executables load faster side by side than in turn).
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="han-jax-executables")


def prefetch(*functions) -> None:
    """:meth:`PersistentFunction.prefetch` for each of ``functions`` that is one, in this order."""
    for fn in functions:
        if isinstance(fn, PersistentFunction):
            fn.prefetch()


def _write_whole(path: str, blob: bytes) -> None:
    """Writes ``blob`` to ``path`` whole and readable by its owner only; a failure costs the next start a compile."""
    try:
        atomic_write(path, lambda f: f.write(blob), binary=True, mode=0o600)
    except OSError as e:  # a full or read-only disk costs the next start a compile, nothing more
        print(f"han-jax: could not store {path} ({e.strerror}); the next start compiles it again",
              file=sys.stderr)


def persistent(jitted: Callable, name: str, key: Any, *, without_store: Optional[Callable] = None
               ) -> PersistentFunction:
    """``jitted`` with its compiled executables stored across processes under (``name``, ``key``, arguments).

    ``key`` must identify everything the function closes over (for han-jax's steps: the step specification),
    and its ``repr`` must be stable between processes. ``without_store`` (default ``jitted``) is what a
    call runs when nothing is stored, e.g. the eager function where a compile per configuration would
    cost more than it saves.
    """
    return PersistentFunction(jitted, name, key, without_store)
