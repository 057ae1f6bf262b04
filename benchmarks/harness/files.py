"""Atomic file writes: a reader (or a run stopped half-way) never sees a half-written file."""
from pathlib import Path

from sharnn_fast.training._io import atomic_open


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, fsync it, then rename it over ``path``
    (with the replaced file's mode, or the umask's for a new file: see atomic_open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        f.write(text)
