"""Files a run writes: atomic writes with the umask's mode, the folder lock, and the clean-up of
temporary files that a killed write left behind."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a folder is then not protected against a second run
    fcntl = None

LOCK_NAME = ".sharnn.lock"
# What atomic_open names its temporary files: "." + the final name + "." + mkstemp's 8 random
# characters (lower-case letters, digits and "_") + ".tmp".
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_umask_lock = threading.Lock()


class WriteError(OSError):
    """Writing a file failed for a reason outside the program (a full disk, a quota, an I/O
    error); the message is one line naming the reason and the file."""


def write_failure(err: BaseException, path) -> Optional[str]:
    """Why writing ``path`` failed, in words, when ``err`` (or what caused it) is a failure of the
    storage: an OSError, or the RuntimeError torch.save's writer raises when a write comes up
    short ("unexpected pos"), which on a full disk is the only trace of ENOSPC. None otherwise."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            if seen.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"no space left on the device holding {Path(path).parent}"
            return f"{seen.strerror or os.strerror(seen.errno)} (errno {errno.errorcode.get(seen.errno, seen.errno)})"
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < 64 << 20:
                return f"no space left on the device holding {Path(path).parent}"
        return "a write came up short (torch.save: unexpected position)"
    return None


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file next to ``path`` for writing; on a clean exit, flush, fsync, rename it
    to ``path`` and fsync the folder, so ``path`` holds either the old or the new content, never a
    mix. On an error the temporary file is removed and ``path`` is untouched. The file gets the
    mode of the file it replaces, or a new file's mode under the umask (:func:`new_file_mode`),
    not mkstemp's 0600. The temporary file is ``.NAME.XXXXXXXX.tmp`` (:data:`TEMPORARY_NAME`); a
    process killed mid-write leaves it behind (see :func:`remove_stale_temporaries`).
    A failure of the storage (a full disk, say) becomes a :class:`WriteError` saying so and naming
    ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            with contextlib.suppress(OSError):  # best effort: some file systems have no modes
                os.chmod(tmp_name, new_file_mode(path))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        reason = write_failure(err, path) if isinstance(err, Exception) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if reason is not None and not isinstance(err, WriteError):
            raise WriteError(f"{reason}: could not write {path}") from err
        raise
    _fsync_dir(path.parent)


def current_umask() -> int:
    """This process's umask (e.g. 0o022), read without changing it where Linux tells it
    (/proc/self/status, Linux 4.7+); elsewhere set and restored at once, under a lock."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(path) -> int:
    """The permission bits a file written at ``path`` should get: those of the file it replaces,
    so a resume keeps a mode the user set, else what ``open()`` gives a new file, 0o666 less the
    umask (0o644 under the usual umask 0o022)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder, names: Iterable[str], before: float) -> list[tuple[Path, int]]:
    """Remove the temporary files that :func:`atomic_open` left in ``folder`` (not below it) when
    its process was killed mid-write: those named ``.NAME.XXXXXXXX.tmp`` for a NAME in ``names``
    and last modified before ``before`` (a time.time()). Call it only while holding the folder's
    :class:`FolderLock`, so that no live writer owns them. Returns [(path, size in bytes)] of the
    files removed."""
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
