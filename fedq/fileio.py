"""Positional file I/O for fedq's on-disk stores (the received version, x̂, encoded residuals, safetensors
files): whole buffers at a byte offset, without a shared file position, so threads share one descriptor.

Linux moves at most about 2 GiB per ``pwrite``/``preadv`` call and may move less: each call here is capped at
1 GiB and repeated until the buffer is done.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fedq.errors import NoSpaceError

_IO_BYTES = 1 << 30  # per call


def bytes_of(array: Any) -> memoryview:
    """A writable byte view of a uint8 numpy array (the memory of the tensor it views)."""
    return memoryview(array)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _IO_BYTES], offset + done)


def pread_into(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done : done + _IO_BYTES]], offset + done)
        if n == 0:
            raise OSError(f"short read at byte {offset + done} of a fedq store")
        done += n


@contextmanager
def room_in(where: str | os.PathLike[str], advice: Callable[[], str]) -> Iterator[None]:
    """Writes into ``where`` that find no room raise ``NoSpaceError`` naming it and ``advice()`` (asked only
    then): a bare ``OSError`` from deep inside a write names neither the directory nor what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpaceError(f"no room in {os.fspath(where)}: {exc.strerror or 'full'}. {advice()}") from None
