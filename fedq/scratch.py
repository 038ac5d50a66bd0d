"""Where a client keeps its state on disk, and whether that place has room for it.

A client keeps the version it received (or x̂: ``fedq.basestore``) and its encoded error-feedback residuals
(``fedq.codecs.feedback``) in unlinked temporary files of one directory: ``Client(scratch_dir=...)``, else
``$TMPDIR`` or /tmp. On many systems /tmp is a tmpfs, held in memory: a Llama-3.2-1B client's x̂ (5.7 GB)
then takes the memory that keeping it on disk is meant to spare, and a small one filled up part way through a
download with a bare ``OSError``. So a store checks for room before a download, a write that finds none says
which directory and what to do, and a large store in memory is said once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from fedq.errors import ConfigError, NoSpaceError
from fedq.fileio import room_in
from fedq.units import human_bytes

log = logging.getLogger(__name__)

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_ADVICE = "Give Client(scratch_dir=...) a directory on a disk with room, or set TMPDIR"
WARN_BYTES = 1 << 30  # a store this large in memory is worth a warning; a small model's is not
_warned: set[str] = set()  # directories said to be in memory, once per process


def directory(scratch_dir: str | os.PathLike[str] | None) -> str:
    """The directory to use: ``scratch_dir`` (an existing, writable directory) or the temporary one."""
    if scratch_dir is None:
        return tempfile.gettempdir()
    path = Path(scratch_dir)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"scratch_dir {str(path)!r} is not a writable directory")
    return str(path)


def temporary_file(where: str) -> IO[bytes]:
    """An unlinked file in ``where``: gone when closed or when the process dies."""
    return tempfile.TemporaryFile(dir=where)


def check_room(where: str, nbytes: int, what: str) -> None:
    """Refuse, before anything is written, a store of ``nbytes`` that ``where`` has no room for."""
    stat = os.statvfs(where)
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise NoSpaceError(
            f"no room in {where} for the client's state: {what} needs {human_bytes(nbytes)}, "
            f"{human_bytes(free)} free. {_ADVICE}{_in_memory(where)}"
        )
    kind = filesystem_type(where)
    if kind in MEMORY_FILESYSTEMS and nbytes >= WARN_BYTES and where not in _warned:
        _warned.add(where)
        log.warning(
            "%s (%s) is kept in %s, a %s: in memory, not on disk. %s",
            what,
            human_bytes(nbytes),
            where,
            kind,
            _ADVICE,
        )


def writing(where: str) -> AbstractContextManager[None]:
    """A write into ``where`` that runs out of room raises ``NoSpaceError`` naming it and the fix."""
    return room_in(where, lambda: _ADVICE + _in_memory(where))


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem ``path`` is on (``tmpfs``, ``ext4``, ...), from /proc/self/mounts; None
    where that cannot be read (not Linux)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for point, kind in entries:
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= best[0]
        ):
            best = (len(point), kind)
    return None if best is None else best[1]


def _in_memory(where: str) -> str:
    kind = filesystem_type(where)
    return f" ({where} is a {kind}: memory)" if kind in MEMORY_FILESYSTEMS else ""
