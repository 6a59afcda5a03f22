"""Files written whole: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
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


def write_json(path: str, data) -> None:
    """``data`` as indented JSON, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: json.dump(data, f, indent=1))
