"""Atomic file writes: a reader, or a process killed half-way, sees the old file or the new one,
never a part of one. The one implementation behind every file the package and its tools write:
checkpoints, prepared data, metrics, the autotune cache, benchmark results, the compile report.

Below the model in the layers (docs/architecture.md): it imports nothing of the package, so
any module may use it."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Optional

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
    process killed mid-write leaves it behind (``sharnn`` removes those it finds in its folders:
    sharnn_fast.training._io.remove_stale_temporaries).
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


def write_atomically(path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_open`, creating its folder first.
    Raises WriteError (a full disk, say) or another OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as handle:
        handle.write(text)


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
