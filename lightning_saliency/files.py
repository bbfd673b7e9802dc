"""Atomic file writes: a reader (a CI gate, a dashboard, a resumed run) never sees half a file.

:func:`atomic_write` writes to a temporary file in the destination's folder, flushes and fsyncs it, then renames
it over the destination with ``os.replace`` (atomic on POSIX and Windows). A process killed mid-write leaves the
previous complete file and, at worst, a hidden ``.<name>.*.tmp`` beside it, which :func:`remove_leftovers`
clears when the next run opens the folder. The file gets the permissions an
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

__all__ = ["atomic_write", "remove_leftovers"]

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


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed writer left in ``directory`` (``.<name>.*.tmp``, as
    :func:`atomic_write` names them; not recursive). Returns their names. Call it only on a folder no other
    process is writing to.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, ".report.json.k3j2.tmp"), "w").close()
        >>> remove_leftovers(d)
        ['.report.json.k3j2.tmp']
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return sorted(removed)
