"""Atomic file writes: a reader (a CI gate, a dashboard, a resumed run) never sees half a file.

:func:`atomic_write` writes to a temporary file in the destination's folder, flushes and fsyncs it, then renames
it over the destination with ``os.replace`` (atomic on POSIX and Windows). A process killed mid-write leaves the
previous complete file and, at worst, a hidden ``.<name>.*.tmp`` beside it. The file gets the permissions an
ordinary ``open(path, "w")`` would give it (``0o666`` less the umask), not ``mkstemp``'s owner-only ``0o600``,
so another user (a CI job, a notebook server) can read the report.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "sub", "a.txt")
    >>> atomic_write(path, lambda f: f.write(b"hello"))
    >>> open(path, "rb").read()
    b'hello'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]

_MODE: int | None = None


def _file_mode() -> int:
    """``0o666`` less the process's umask (read once: reading it means setting it)."""
    global _MODE
    if _MODE is None:
        mask = os.umask(0o022)
        os.umask(mask)
        _MODE = 0o666 & ~mask
    return _MODE


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` (binary mode), then rename it to ``path``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); harmless where directories cannot be opened
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
