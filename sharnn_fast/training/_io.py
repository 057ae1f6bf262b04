"""Folders a run writes into: the folder lock, and the clean-up of the temporary files that a
killed write left behind. The writes themselves are sharnn_fast._files.atomic_open's."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

from .._files import TEMPORARY_NAME
from .errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a folder is then not protected against a second run
    fcntl = None

LOCK_NAME = ".sharnn.lock"


def remove_stale_temporaries(folder, names: Iterable[str], before: float) -> list[tuple[Path, int]]:
    """Remove the temporary files that :func:`sharnn_fast._files.atomic_open` left in ``folder``
    (not below it) when its process was killed mid-write: those named ``.NAME.XXXXXXXX.tmp`` for a
    NAME in ``names`` and last modified before ``before`` (a time.time()). Call it only while
    holding the folder's :class:`FolderLock`, so that no live writer owns them. Returns
    [(path, size in bytes)] of the files removed."""
    names, removed = set(names), []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = TEMPORARY_NAME.match(entry.name)
            if match is None or match["name"] not in names or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                info = entry.stat(follow_symlinks=False)
                if info.st_mtime < before:
                    os.unlink(entry.path)
                    removed.append((Path(entry.path), info.st_size))
    return removed


class FolderLock:
    """An exclusive lock on ``folder`` held by this process until :meth:`release` (or its end):
    ``fcntl.flock`` on ``folder/.sharnn.lock``. The kernel drops the lock when the process dies,
    however it dies (SIGKILL included), so a crashed run never leaves a folder locked; the lock
    file itself stays, holding the last holder's pid, host, start time and command.

    acquire() raises UserInputError, naming ``argument`` and the holder, when another process
    holds the lock, or when the lock file cannot be opened."""

    def __init__(self, folder, *, argument: str, command: str):
        self.folder, self.argument, self.command = Path(folder), argument, command
        self.fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as err:
            raise UserInputError(f"{self.argument} {self.folder}: cannot open its lock file {self.path} "
                                 f"({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserInputError(f"{self.argument} {self.folder} is in use by {holder}: one run per folder at a "
                                 f"time; wait for it to end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} ({self.command}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
