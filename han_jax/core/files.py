"""Files written whole: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import stat
import uuid
from typing import Callable


def atomic_write(path: str, write: Callable, *, binary: bool = False, mode: int = 0o666) -> None:
    """Writes a file through ``write(file)`` into a temporary file beside it, then renames it into place.

    A reader never sees a half-written file, and an interrupted write leaves the old one
    (``os.replace`` is atomic within a file system, hence the temporary file beside the
    target). ``mode`` is the new file's permission bits before the umask (``open``'s by
    default; 0o600 for a file only its owner may read).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def open_regular(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a regular file that is never reached through a symbolic link at ``path``.

    A run folder may live in a shared place: a ``.lock`` or ``metrics.jsonl`` planted there as a
    link to another file would otherwise have that file truncated or appended to.

    Raises:
      FileExistsError: ``path`` is a symbolic link or not a regular file (one line, naming it).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileExistsError(f"{path}: is a symbolic link; expected a regular file written by han-jax "
                                  "(remove the link)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileExistsError(f"{path}: is not a regular file; expected one written by han-jax")
    return fd


def append_text(path: str, text: str) -> None:
    """Appends ``text`` in one write to the regular file ``path`` (created if absent; never through a link)."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def json_safe(data):
    """``data`` with every non-finite float replaced by None: strict JSON, which ``NaN`` and ``Infinity`` are not."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if _non_finite(data):
        return None
    return data


def _non_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value)


def non_finite_keys(data: dict) -> list:
    """The keys of ``data`` whose values are non-finite floats (reported beside :func:`json_safe`'s nulls)."""
    return sorted(k for k, v in data.items() if _non_finite(v))


def write_json(path: str, data) -> None:
    """``data`` as indented, strict JSON (non-finite numbers as null), written atomically (:func:`atomic_write`)."""
    safe = json_safe(data)
    atomic_write(path, lambda f: json.dump(safe, f, indent=1, allow_nan=False))
