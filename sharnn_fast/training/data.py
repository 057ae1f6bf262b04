"""Byte-level corpora: preparing train/valid/test splits, the embedded default corpus, and
byte streams cut into [T, B] batches.

Every corpus is read as raw bytes (tokens 0..255), as enwik8 is in the paper. Splits stay on disk
(:class:`FileBytes`): each batch reads its (T + 1) * B bytes with ``pread``, so the corpus is
never loaded whole, and a data file truncated during a run stops it with a message (a memory
mapping would die of SIGBUS).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import pkgutil
import stat
import sys
import time
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import torch

from .._files import atomic_open
from ._io import FolderLock, remove_stale_temporaries
from .errors import UserInputError

SPLITS = ("train", "valid", "test")
ENWIK8_BYTES = 100_000_000
# The paper's enwik8 split (Merity 2019, and the Hutter prize convention before it).
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
META_NAME = "meta.json"
META_FORMAT = "sharnn_fast.prepared-bytes"
CHUNK_BYTES = 1 << 20
MIN_DEFAULT_CORPUS_BYTES = 200_000
# Standard library modules whose import has side effects (opening a browser, printing, GUI
# toolkits) or is slow; they are left out of the embedded corpus.
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
                   "test", "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "xxsubtype"}


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' (or '90/5/5') -> train, valid and test fractions summing to 1."""
    parts = text.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(0 < v < math.inf for v in values):
        raise UserInputError(f"--split must be three positive numbers for train,valid,test such as "
                             f"0.9,0.05,0.05 or 90/5/5, got {text!r}")
    total = sum(values)
    return tuple(v / total for v in values)


# ------------------------------------------------------------------------------------------------
# Sources: a file, a zip archive or a folder, read as one stream of bytes


@dataclass(frozen=True)
class _Source:
    """A corpus on disk: one or more byte streams read one after another. ``skipped``: (path
    relative to the folder, why) for the entries of a folder that are not read."""
    path: Path
    parts: tuple  # (path or (zip path, member name), size in bytes) in reading order
    size: int
    skipped: tuple = ()

    def listing(self) -> list:
        """meta.json's "files": each part read, in reading order, as {"path", "bytes"} (relative to
        a folder source; the member name in a zip; the file's name otherwise)."""
        def name(part):
            if isinstance(part, tuple):
                return part[1]
            return part.relative_to(self.path).as_posix() if self.path.is_dir() else part.name
        return [dict(path=name(part), bytes=size) for part, size in self.parts]

    def chunks(self) -> Iterator[bytes]:
        for part, _ in self.parts:
            with (zipfile.ZipFile(part[0]).open(part[1]) if isinstance(part, tuple)
                  else open(part, "rb")) as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

    @property
    def is_enwik8(self) -> bool:
        named = self.path.name in ("enwik8", "enwik8.zip")
        if named and self.size != ENWIK8_BYTES:
            raise UserInputError(f"{self.path} is named like enwik8 but holds {self.size:,} bytes, "
                                 f"not {ENWIK8_BYTES:,}: is it truncated?")
        return named or self.size == ENWIK8_BYTES


def _open_source(path) -> _Source:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"data path {path} does not exist")
    skipped = ()
    if path.is_dir():
        parts, skipped = _folder_parts(path)
    elif zipfile.is_zipfile(path) and path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            parts = tuple(((path, info.filename), info.file_size)
                          for info in sorted(archive.infolist(), key=lambda i: i.filename)
                          if not info.is_dir())
    else:
        parts = ((path, path.stat().st_size),)
    size = sum(n for _, n in parts)
    if size == 0:
        raise UserInputError(f"data path {path} is empty" + (" (no files in the folder)" if not parts else ""))
    return _Source(path, parts, size, skipped)


def _folder_parts(folder: Path) -> tuple[tuple, tuple]:
    """The files of a folder in sorted path order, hidden ones (a name starting with ".") left
    out, following symbolic links to files and folders but reading every file once: a link (or
    hard link) to a file already read, a link to a folder already walked (a loop) and a broken
    link are skipped. Returns (((path, bytes), ...), ((relative path, why skipped), ...))."""
    seen_files, seen_dirs, found, skipped = {}, {}, [], []
    for root, dirs, names in os.walk(folder, followlinks=True):
        root = Path(root)
        relative = root.relative_to(folder).as_posix()
        first = seen_dirs.setdefault(os.path.realpath(root), relative)
        if first != relative:  # a link to a folder walked already (or a loop back up)
            skipped.append((relative, f"the same folder as {first if first != '.' else 'the source'}, read once"))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [root / n for n in names if not n.startswith(".")]
    parts = []
    for p in sorted(found, key=lambda p: p.relative_to(folder).parts):
        relative = p.relative_to(folder).as_posix()
        try:
            st = p.stat()
        except OSError:
            skipped.append((relative, f"a broken link (to {os.readlink(p)})" if p.is_symlink() else "unreadable"))
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append((relative, "not a regular file"))
            continue
        first = seen_files.setdefault((st.st_dev, st.st_ino), relative)
        if first != relative:
            skipped.append((relative, f"the same file as {first}, read once"))
            continue
        parts.append((p, st.st_size))
    return tuple(parts), tuple(sorted(skipped))


def split_sizes(total: int, fractions: Optional[tuple] = None, enwik8: bool = False) -> tuple[int, int, int]:
    """Bytes in train, valid and test: the paper's enwik8 split, else the fractions (default
    90/5/5) rounded down, test taking the remainder."""
    if enwik8 and fractions is None:
        return ENWIK8_SPLIT
    fractions = fractions or DEFAULT_FRACTIONS
    train, valid = int(total * fractions[0]), int(total * fractions[1])
    sizes = (train, valid, total - train - valid)
    if min(sizes) <= 0:
        raise UserInputError(f"a corpus of {total:,} bytes is too small to split into train, valid "
                             f"and test by {fractions}")
    return sizes


def _split_rule(sizes, enwik8: bool, fractions) -> str:
    if enwik8 and fractions is None:
        return "enwik8 (the paper's split): first 90,000,000 bytes train, next 5,000,000 valid, last 5,000,000 test"
    fractions = fractions or DEFAULT_FRACTIONS
    return (f"in order: train {fractions[0]:g}, valid {fractions[1]:g}, test the rest "
            f"({sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} bytes)")


def prepare(source, out_dir, fractions: Optional[tuple] = None) -> dict:
    """Write ``train.bin``, ``valid.bin`` and ``test.bin`` (raw bytes) and ``meta.json`` to out_dir.

    source: the enwik8 file, enwik8.zip, any file, a .zip of files, or a folder of files (read in
    sorted path order, hidden files left out; symbolic links followed, but each file read once:
    see :func:`_folder_parts`). meta.json lists the files read ("files": path and bytes, in order)
    and the entries skipped ("skipped": path and reason). enwik8 (by name or by its size of 100,000,000 bytes)
    gets the paper's split: first 90M bytes train, next 5M valid, last 5M test. Anything else is
    split in order by ``fractions`` (train, valid, test; default 0.9, 0.05, 0.05).
    Every file is written atomically; meta.json (sizes, sha256, split rule) is written last. One
    prepare per out_dir at a time (a :class:`~._io.FolderLock`); temporary files that a killed
    prepare left there are removed first.
    Returns the meta dict. Raises UserInputError for a missing, empty or too small source, or an
    out_dir that another prepare is writing.
    """
    started = time.time()
    src = _open_source(source)
    enwik8 = src.is_enwik8
    sizes = split_sizes(src.size, fractions, enwik8)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"output {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a path through a file, a read-only file system, /proc
        raise UserInputError(f"output {out_dir}: cannot create it ({err.strerror or err})") from None
    with FolderLock(out_dir, argument="output", command="sharnn prepare"):
        remove_stale_temporaries(out_dir, [f"{name}.bin" for name in SPLITS] + [META_NAME], before=started)
        return _write_splits(source, src, sizes, out_dir, enwik8, fractions)


def _write_splits(source, src, sizes, out_dir: Path, enwik8: bool, fractions) -> dict:
    files, chunks, pending = {}, src.chunks(), b""
    for name, size in zip(SPLITS, sizes):
        digest, left = hashlib.sha256(), size
        with atomic_open(out_dir / f"{name}.bin") as out:
            while left:
                if not pending:
                    pending = next(chunks)
                piece, pending = pending[:left], pending[left:]
                out.write(piece)
                digest.update(piece)
                left -= len(piece)
        files[name] = dict(file=f"{name}.bin", bytes=size, sha256=digest.hexdigest())
    meta = dict(format=META_FORMAT, version=1, source=str(Path(source).resolve()), source_bytes=src.size,
                split_rule=_split_rule(sizes, enwik8, fractions), splits=files, files=src.listing(),
                skipped=[dict(path=p, reason=why) for p, why in src.skipped])
    with atomic_open(out_dir / META_NAME, "w") as out:
        json.dump(meta, out, indent=1)
        out.write("\n")
    return meta


# ------------------------------------------------------------------------------------------------
# Loading: splits read from disk


@dataclass
class Corpus:
    """The three splits of a corpus, each a :class:`FileBytes` (a byte range of a file on disk).
    ``digests``: {split: {"bytes": n, "sha256": hex}}, hashed once when loaded (prepared splits are
    checked against their meta.json)."""
    splits: dict
    description: str
    digests: dict = None


class _OpenFile:
    """One open data file, shared by the ranges cut from it, with its size and modification time
    when it was opened: a change during a run stops it with a message."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise UserInputError(f"cannot read the data file {self.path} ({err.strerror})") from None
        weakref.finalize(self, os.close, self.fd)
        self.stat = self._now()

    def _now(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        """Raise UserInputError if the file was removed, resized or rewritten since it was opened."""
        now = self._now()
        if now != self.stat:
            self.changed(now)

    def changed(self, now=None) -> NoReturn:
        """Raise the UserInputError that says how the file changed."""
        now = self._now() if now is None else now
        what = ("was removed" if now is None else f"now holds {now[0]:,} bytes, not {self.stat[0]:,}"
                if now[0] != self.stat[0] else "was modified")
        raise UserInputError(f"the data file {self.path} changed during the run ({what}): stopped; the "
                             f"checkpoints saved so far are intact")


class FileBytes:
    """Bytes ``offset .. offset + size - 1`` of a file, read on demand with ``pread``.

    The corpus is never loaded whole (enwik9 is 1 GB per process) and never memory-mapped: reading
    a mapped page of a file truncated since kills the process with SIGBUS, with no message and no
    way to catch it. A read here that comes back short, or a file whose size or modification time
    changed, raises UserInputError naming the file instead; the checkpoints already saved stay good.
    """

    def __init__(self, path, offset: int = 0, size: Optional[int] = None, *, _file: Optional[_OpenFile] = None):
        self.file = _file or _OpenFile(path)
        self.offset = offset
        self.size = self.file.stat[0] - offset if size is None else size

    @property
    def path(self) -> Path:
        return self.file.path

    def __len__(self) -> int:
        return self.size

    def narrow(self, start: int, size: int) -> "FileBytes":
        """Bytes ``start .. start + size - 1`` of this range (no read)."""
        if not (0 <= start and 0 <= size and start + size <= self.size):
            raise ValueError(f"range {start} + {size} is outside {self.size} bytes")
        return FileBytes(self.path, self.offset + start, size, _file=self.file)

    def read_rows(self, start: int, stride: int, rows: int, width: int) -> torch.Tensor:
        """uint8 [rows, width]: row r holds bytes ``start + r * stride`` .. ``+ width - 1`` of this
        range. Raises UserInputError if the file changed since it was opened."""
        if not (rows >= 0 and width >= 0 and start >= 0
                and (rows == 0 or start + (rows - 1) * stride + width <= self.size)):
            raise ValueError(f"rows {rows} x {width} from {start} (stride {stride}) are outside {self.size} bytes")
        self.file.check()
        out = torch.empty(rows, width, dtype=torch.uint8)
        buffer = memoryview(out.numpy()).cast("B")
        for r in range(rows):
            row, at = buffer[r * width:(r + 1) * width], self.offset + start + r * stride
            while len(row):
                got = os.preadv(self.file.fd, [row], at)
                if got == 0:  # end of file: truncated between the check and the read
                    self.file.changed()
                row, at = row[got:], at + got
        return out

    def read(self) -> bytes:
        """All the bytes of this range (for tests and small ranges)."""
        return bytes(self.read_rows(0, 0, 1, self.size).numpy()) if self.size else b""

    def sha256(self) -> str:
        """The sha256 of this range's bytes, read in chunks of CHUNK_BYTES."""
        digest = hashlib.sha256()
        for start in range(0, self.size, CHUNK_BYTES):
            digest.update(self.read_rows(start, 0, 1, min(CHUNK_BYTES, self.size - start)).numpy())
        return digest.hexdigest()


def check_same_data(saved: dict, digests: dict, path) -> None:
    """Raise UserInputError naming the first split whose size or sha256 differs between the data a
    checkpoint was trained on (``saved``) and the data given now (``digests``)."""
    for split, theirs in saved.items():
        ours = digests.get(split)
        if ours is None or ours == theirs:
            continue
        what = (f"{theirs['bytes']:,} bytes then, {ours['bytes']:,} now" if ours["bytes"] != theirs["bytes"]
                else f"the same size, {theirs['bytes']:,} bytes, but other content: sha256 "
                     f"{theirs['sha256'][:12]}... then, {ours['sha256'][:12]}... now")
        raise UserInputError(f"the {split} split is not the data checkpoint {path} was trained on ({what}): "
                             f"resume with the same --data, or start a new run")


def load_corpus(path=None, fractions: Optional[tuple] = None) -> Corpus:
    """The splits of ``path``: a folder written by :func:`prepare`, or any file split on the fly
    (enwik8 by the paper's rule, anything else by ``fractions``, default 90/5/5). None means the
    embedded default corpus (:func:`default_corpus_file`), split 90/5/5.

    Every split is hashed (sha256) once, here; a prepared split must match its meta.json in size
    and sha256.

    Raises UserInputError for a missing or empty path, a folder that was not prepared, or a
    prepared folder whose files do not match its meta.json.
    """
    if path is None:
        file = default_corpus_file()
        description = f"the embedded default corpus ({_corpus_label()}, {file.stat().st_size:,} bytes)"
        return _split_file(file, fractions, description)
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"data path {path} does not exist")
    if path.is_dir():
        return _load_prepared(path)
    if zipfile.is_zipfile(path) and path.suffix == ".zip":
        raise UserInputError(f"{path} is a zip archive: unpack it or run `sharnn prepare {path} DIR` "
                             f"and train with --data DIR")
    return _split_file(path, fractions, str(path))


def _split_file(path: Path, fractions, description: str) -> Corpus:
    src = _open_source(path)
    enwik8 = src.is_enwik8
    sizes = split_sizes(src.size, fractions, enwik8)
    data = FileBytes(path, 0, src.size)
    starts = (0, sizes[0], sizes[0] + sizes[1])
    splits = {name: data.narrow(start, size) for name, start, size in zip(SPLITS, starts, sizes)}
    digests = {name: dict(bytes=len(split), sha256=split.sha256()) for name, split in splits.items()}
    return Corpus(splits, f"{description}, split {_split_rule(sizes, enwik8, fractions)}", digests)


def _check_meta_entry(meta_path: Path, name: str, entry) -> None:
    """Raise UserInputError unless ``entry`` (meta.json's splits[name]) has the fields `sharnn
    prepare` writes: "file" a file name, "bytes" an integer >= 0, "sha256" 64 hex digits (or null)."""
    def bad(field: str, expected: str):
        got = entry.get(field) if isinstance(entry, dict) else entry
        return UserInputError(f"{meta_path}: splits.{name}.{field} must be {expected}, got {json.dumps(got)}: "
                              f"prepare the folder again")
    if not isinstance(entry, dict):
        raise bad("file", "an object with file, bytes and sha256")
    file = entry.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file:
        raise bad("file", "the name of a file in the folder")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("bytes", "an integer >= 0")
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise bad("sha256", "64 hexadecimal digits")


def _load_prepared(folder: Path) -> Corpus:
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise UserInputError(f"{folder} is a folder without {META_NAME}: run `sharnn prepare SOURCE "
                             f"{folder}` first, or pass a file to --data")
    try:
        meta = json.loads(meta_path.read_text())
        entries = {name: meta["splits"][name] for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{meta_path} is not a meta.json written by `sharnn prepare` ({err})") from None
    for name, entry in entries.items():
        _check_meta_entry(meta_path, name, entry)
    splits, digests = {}, {}
    for name, entry in entries.items():
        file = folder / entry["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != entry["bytes"]:
            raise UserInputError(f"{file} should hold {entry['bytes']:,} bytes as {meta_path} says, "
                                 f"but {'it is missing' if size is None else f'holds {size:,}'}: "
                                 f"prepare the folder again")
        if size == 0:
            raise UserInputError(f"{file} is empty")
        splits[name] = FileBytes(file, 0, size)
        digests[name] = dict(bytes=size, sha256=splits[name].sha256())
        if entry.get("sha256") not in (None, digests[name]["sha256"]):
            raise UserInputError(f"{file} does not match the sha256 in {meta_path} (same size, other content): "
                                 f"it changed after `sharnn prepare`; prepare the folder again")
    return Corpus(splits, f"{folder} ({meta.get('split_rule', 'prepared')})", digests)


# ------------------------------------------------------------------------------------------------
# The embedded default corpus


def stdlib_docstrings(max_bytes: int) -> bytes:
    """Docstrings of the standard library's top-level modules and their public classes and
    functions (English prose written by people), in sorted module order, de-duplicated, joined by
    blank lines, at most ``max_bytes`` of UTF-8. Deterministic for a given Python installation."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in SKIPPED_MODULES)
    seen, texts, size = set(), [], 0
    # Importing (and reading the attributes of) deprecated modules warns; the text is the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                with contextlib.redirect_stdout(None):
                    module = importlib.import_module(name)
            except Exception:  # platform-specific or broken modules are simply left out
                continue
            members = [module] + [obj for attr, obj in sorted(vars(module).items())
                                  if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                                  and getattr(obj, "__module__", None) == name]
            for obj in members:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
                    size += len(doc) + 2
            if size >= max_bytes:
                break
    return "\n\n".join(texts).encode("utf-8")[:max_bytes]


def _corpus_label() -> str:
    return f"docstrings of the Python {sys.version_info.major}.{sys.version_info.minor} standard library"


def cache_dir() -> Path:
    """Where built files are kept: $SHARNN_FAST_CACHE, else $XDG_CACHE_HOME/sharnn_fast, else
    ~/.cache/sharnn_fast."""
    if os.environ.get("SHARNN_FAST_CACHE"):
        return Path(os.environ["SHARNN_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sharnn_fast"


def default_corpus_file(max_bytes: int = 4_000_000) -> Path:
    """The embedded default corpus as a file of bytes: the standard library's docstrings (see
    :func:`stdlib_docstrings`), built on this machine without a network on first use (a fraction
    of a second) and kept in :func:`cache_dir`. Raises UserInputError if this Python has no
    docstrings to give (started with -OO) or the cache folder cannot be written."""
    v = sys.version_info
    path = cache_dir() / f"stdlib-docstrings-py{v.major}.{v.minor}-{max_bytes}.bin"
    if path.is_file() and path.stat().st_size >= MIN_DEFAULT_CORPUS_BYTES:
        return path
    text = stdlib_docstrings(max_bytes)
    if len(text) < MIN_DEFAULT_CORPUS_BYTES:
        raise UserInputError(f"the embedded corpus came out at {len(text):,} bytes, under "
                             f"{MIN_DEFAULT_CORPUS_BYTES:,}: this Python has few docstrings (run "
                             f"without -OO) - or pass --data FILE")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as out:
            out.write(text)
    except OSError as err:
        raise UserInputError(f"cannot write the embedded corpus to {path} ({err.strerror}): set "
                             f"SHARNN_FAST_CACHE to a writable folder") from None
    return path


# ------------------------------------------------------------------------------------------------
# Batches


class BatchStream:
    """One split laid out as parallel streams, as the published batchify does: the bytes are cut
    into equal columns (the remainder dropped), column j holding the j-th contiguous stretch, and
    each rank reads a contiguous run of them.

    ``batch_size`` counts one rank's columns (training: ``batch_size * world_size`` columns, rank r
    reads r * batch_size ... (r + 1) * batch_size - 1), or with ``shared=True`` the columns of all
    ranks together (``sharnn eval``: the same columns, so the same bytes, however many processes
    run; rank r reads r * batch_size // world_size up to (r + 1) * batch_size // world_size).

    ``data`` is a :class:`FileBytes` (a split on disk, as :func:`load_corpus` gives) or a uint8
    tensor [n] in memory. ``segment(position, seq_len)`` returns inputs x and targets y, each [T, B]
    torch.long on the device, with T = min(seq_len, length - 1 - position) and y the next byte of
    x. Only those (T + 1) * B bytes are read; the corpus is never loaded whole.

    Raises UserInputError: the split is too short for the columns; with ``shared``, fewer columns
    than ranks; from ``segment``, a data file that changed during the run.
    """

    def __init__(self, data, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 split: str = "train", min_length: int = 2, shared: bool = False):
        if shared:
            if batch_size < world_size:
                raise UserInputError(f"--batch-size {batch_size} counts the columns of all processes, and "
                                     f"each of the {world_size} processes needs at least one: use "
                                     f"--batch-size {world_size} or more, or fewer processes")
            columns, first, end = batch_size, rank * batch_size // world_size, (rank + 1) * batch_size // world_size
        else:
            columns, first, end = batch_size * world_size, rank * batch_size, (rank + 1) * batch_size
        self.length = len(data) // columns  # bytes per column
        if self.length < min_length:
            need = columns * min_length
            raise UserInputError(f"the {split} split has {len(data):,} bytes, too short for "
                                 f"{columns} columns (all processes together) of at least {min_length} "
                                 f"bytes each (bptt + 1 when training): it needs at least {need:,} "
                                 f"bytes; use a smaller batch size or bptt, or more data")
        self.data, self.first, self.batch_size = data, first, end - first
        if not isinstance(data, FileBytes):  # in memory: [B, L], this rank's columns
            self.grid = data[:self.length * columns].reshape(columns, self.length)[first:end]

    @property
    def predictions_per_column(self) -> int:
        return self.length - 1

    def segment(self, position: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = min(seq_len, self.length - 1 - position)
        if seq_len < 1:
            raise ValueError(f"position {position} is past the end of the stream ({self.length} bytes per column)")
        start = self.first * self.length + position  # column j starts j * length bytes further on
        if isinstance(self.data, FileBytes):
            block = self.data.read_rows(start, self.length, self.batch_size, seq_len + 1)  # [B, T + 1]
        else:
            block = self.grid.narrow(1, position, seq_len + 1)
        block = block.to(device=device, dtype=torch.long).t().contiguous()  # [T + 1, B]
        return block[:-1], block[1:]
