"""An exclusive lock on a run folder, so that two processes never train into the same folder at once.

The lock is ``<folder>/.lock``, held with ``flock`` and holding the holder's pid. The operating system drops the
lock when its holder exits or is killed, so a lock file left by a killed process does not block the next run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class FolderInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock (``acquire`` / ``release`` for longer spans)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise FolderInUse naming the holder's pid."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(f"run folder {self.path.parent} is in use by process {holder} (lock file "
                                  f"{self.path}); wait for it to finish or stop it") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
