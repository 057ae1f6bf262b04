"""Atomic file writes: a crash mid-write never leaves a broken file under the final name."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


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
    mix. On an error the temporary file is removed and ``path`` is untouched; a failure of the
    storage (a full disk, say) becomes a :class:`WriteError` saying so and naming ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
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


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
