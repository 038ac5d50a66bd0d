"""One writer per shard state directory: an exclusive ``fcntl`` lock held for the aggregator's lifetime.

Two aggregators writing the same journal and staging files corrupt each other silently; the lock makes the
second one refuse to start, naming the holder's pid. The kernel releases the lock when the process dies (also
on SIGKILL), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fedq.errors import ConfigError

LOCK_FILE = "lock"


class StateLock:
    """Hold ``directory/lock`` exclusively until ``release`` (or the process ends)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        self._file: IO[str] | None = open(path, "a+")  # noqa: SIM115 -- held open for the process's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(
                f"{directory} is in use by another aggregator (pid {holder}); one process per shard state "
                "directory",
                reason="state_locked",
            ) from exc
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
