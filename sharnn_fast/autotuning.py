"""Autotuning: "auto" measures the backends on this machine, and only trusts one it has checked.

When autotuning is on, the first call of an op for a given *tuning key* (op, device, dtype, shape
bucket, whether dropout is active, whether a backward follows, and the versions of everything that
could change the answer) does this, on copies of the call's inputs:

1. runs every backend that can run the inputs;
2. checks each against the "torch" backend (or "reference" where torch cannot run), with dropout
   off: outputs and, when a backward follows, the gradients of every input, within the dtype's
   tolerance (:data:`TOLERANCE`). A backend that disagrees is excluded, with a warning naming it and
   the error seen;
3. times the survivors (a warmed-up median of several calls; CUDA events on a GPU), forward only
   for inference and forward + backward for training, and picks the fastest.

The choice is kept in memory and in a JSON file in the user's cache directory
(``$SHARNN_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/sharnn_fast`` or ``~/.cache/sharnn_fast`` on
Linux, ``~/Library/Caches/sharnn_fast`` on macOS, ``%LOCALAPPDATA%\\sharnn_fast`` on Windows),
shared by every process of the user: each new entry is merged into the file under a lock
(``fcntl.flock`` on ``autotune.json.lock`` beside it: read again, add, write atomically), so
processes tuning at the same time lose none of each other's entries. An unreadable or foreign file
is ignored with one warning and rewritten. Every entry carries the proof of its check (the backend
it was checked against, the errors measured and a digest over its fields, :func:`entry_digest`);
an entry that is malformed, lacks that proof or was edited is ignored (one warning naming the file
and the entry), and measured and checked again.

Tuning never changes the caller's results: it works on detached clones, restores the CPU and CUDA
random number generators afterwards, and leaves the caller's autograd graph alone. It never runs
while torch.compile traces or while a CUDA graph is being captured: there the cached choice is
used, or the static preference.

The shape bucket (``sharnn_fast.ops._buckets``, given by each op): every sequence length, batch size
and token count rounded up to a power of two; every width (hidden size, head width, Boom width)
exact. So the growing attention memory of a training run, or the last short segment of an epoch,
reuses a choice.

This module is a leaf below :mod:`sharnn_fast.backend`: it is told the implementations, the compute
dtype and the bucket, and imports neither the backend nor the ops.

Switches: :func:`autotune` (process-wide), else ``SHARNN_FAST_AUTOTUNE=1``/``0``, else off. It is
off by default on every device until a GPU measurement shows its first-call cost is small at the
paper's size (``benchmarks/bench_autotune.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch.utils._pytree import tree_leaves

from . import _env
from ._files import write_atomically

try:
    import fcntl
except ImportError:  # Windows: the cache file is written without a lock
    fcntl = None

log = logging.getLogger("sharnn_fast.autotune")

ENV_SWITCH = "SHARNN_FAST_AUTOTUNE"
ENV_CACHE_DIR = "SHARNN_FAST_CACHE_DIR"
CACHE_FILE = "autotune.json"
FORMAT, VERSION = "sharnn_fast.autotune", 1

# Largest relative error (max |a - b| / max |b|, over each output and gradient) a backend may show
# against the check backend: about 10x the rounding each dtype's kernels show in the tests
# (tests/tolerances.py), far below what a wrong kernel gives.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 3e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
TIMED_CALLS = 5  # after one warm-up call; the median is kept
CHECK_BACKENDS = ("torch", "reference")  # the first that can run is what the others are checked against

_enabled: Optional[bool] = None
_tuning_seconds = 0.0  # wall time spent in tune() by this process
_choices: dict[tuple, tuple[dict, str]] = {}  # (op, device, dtype, bucket, ...) -> (entry, where)
_disk: Optional[dict] = None  # the cache file's entries, loaded once
_warned_cache = False  # the cache file (or entries of it) was ignored, and said so
_warned_write = False  # the cache file could not be written, and said so


def autotune(enabled: Optional[bool] = True) -> None:
    """Turn autotuning of "auto" on or off for this process (``None``: back to the environment
    variable ``SHARNN_FAST_AUTOTUNE``, else off)."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _enabled = enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return _env.choice(ENV_SWITCH) == "1"  # ValueError for anything but 0, 1 or unset


def may_tune_now(device: torch.device) -> bool:
    """Never inside torch.compile's tracing or a CUDA graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------------------------------
# Keys and the cache file
# ---------------------------------------------------------------------------------------------------
_environments: dict[str, dict] = {}


def environment(device: torch.device) -> dict:
    """Everything besides the shapes that can change which backend is fastest or correct (read
    once per device and process)."""
    if str(device) not in _environments:
        _environments[str(device)] = _read_environment(device)
    return _environments[str(device)]


def _read_environment(device: torch.device) -> dict:
    from . import __version__
    env = dict(sharnn_fast=__version__, torch=torch.__version__, python=platform.python_version())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   driver=_cuda_driver_version())
    else:
        env.update(device=cpu_name(), threads=torch.get_num_threads(),
                   capability=torch.backends.cpu.get_cpu_capability())
    return env


def _cuda_driver_version():
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    return getter() if getter is not None else None


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tuning_key(op: str, device: torch.device, dtype: torch.dtype, bucket: tuple, dropout: bool,
               backward: bool) -> str:
    fields = dict(op=op, dtype=str(dtype).replace("torch.", ""), bucket=list(bucket), dropout=dropout,
                  backward=backward, env=environment(device))
    return json.dumps(fields, sort_keys=True)


def cache_dir() -> Path:
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "sharnn_fast"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sharnn_fast"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sharnn_fast"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def _load_disk() -> dict:
    """The cache file's valid entries (read once per process; see :func:`_read_entries`)."""
    global _disk
    if _disk is None:
        _disk = _read_entries(cache_path(), warn=True)
    return _disk


def _read_entries(path: Path, warn: bool) -> dict:
    """{tuning key: entry} of the cache file at ``path``: {} when it is missing. An unreadable or
    foreign file gives {}, and entries that fail :func:`entry_problem` are left out; with ``warn``,
    one warning (once per process) names the file and what was ignored."""
    global _warned_cache
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} {FORMAT} file")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("its entries are not an object")
    except (OSError, ValueError) as err:
        if warn and not _warned_cache:
            warnings.warn(f"ignoring the autotune cache {path} ({err}); it will be rewritten", stacklevel=5)
            _warned_cache = True
        return {}
    valid, dropped = {}, []
    for key, entry in entries.items():
        problem = entry_problem(key, entry)
        if problem is None:
            valid[key] = entry
        else:
            dropped.append(f"{_entry_name(key)}: {problem}")
    if dropped and warn and not _warned_cache:
        warnings.warn(f"ignoring {len(dropped)} entr{'y' if len(dropped) == 1 else 'ies'} of the autotune cache "
                      f"{path} ({'; '.join(dropped)}): measured and checked again when met", stacklevel=5)
        _warned_cache = True
    return valid


def entry_digest(key: str, entry: dict) -> str:
    """sha256 (hex) over a cache entry's tuning key and fields (``digest`` left out), as canonical
    JSON. It is the entry's proof that it is the result of :func:`tune`: the chosen backend was
    checked against ``checked_against`` (its relative errors in ``errors``) and timed. An entry
    edited by hand (another backend, times or errors) no longer matches and is measured again.
    It guards against edits and damage, not against someone who recomputes it on purpose."""
    fields = {k: v for k, v in entry.items() if k != "digest"}
    text = json.dumps(dict(key=key, entry=fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def entry_problem(key, entry) -> Optional[str]:
    """Why a cache entry cannot be used, or None. An entry (written by :func:`tune`) holds
    ``backend`` (the choice), ``times_ms`` {backend: median ms}, ``excluded`` {backend: why},
    ``checked_against`` (the backend the others were checked against: "torch", else
    "reference"), ``errors`` {timed backend: relative error against it}, and ``digest``
    (:func:`entry_digest`). The choice must have been timed and checked within :data:`TOLERANCE`
    for the key's dtype, and the digest must match."""
    try:
        dtype = getattr(torch, json.loads(key)["dtype"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "its key is not a tuning key"
    if not isinstance(entry, dict):
        return "not an object"
    backend, times, errors = entry.get("backend"), entry.get("times_ms"), entry.get("errors")
    if not isinstance(backend, str):
        return "no backend"
    if not isinstance(times, dict) or not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0
                                               for t in times.values()):
        return "no times_ms" if times is None else "times_ms is not {backend: milliseconds}"
    if backend not in times:
        return f"its backend {backend!r} was not timed"
    if not isinstance(entry.get("excluded"), dict) or not all(isinstance(v, str) for v in entry["excluded"].values()):
        return "no excluded backends (an object of reasons)"
    if entry.get("checked_against") not in CHECK_BACKENDS or not isinstance(errors, dict) \
            or not isinstance(entry.get("digest"), str):
        return "no record of its check against torch (written by an older sharnn_fast, or by hand)"
    error = errors.get(backend)
    if not isinstance(error, (int, float)) or not error <= TOLERANCE.get(dtype, 3e-3):
        return f"its backend {backend!r} has no passing check against {entry['checked_against']}"
    if entry["digest"] != entry_digest(key, entry):
        return "its digest does not match its fields (edited after it was measured)"
    return None


def _entry_name(key: str) -> str:
    """'boom float32 bucket [128, 16, 48, true] training' for a tuning key (the key itself if it is
    not one)."""
    try:
        k = json.loads(key)
        return (f"{k['op']} {k['dtype']} bucket {json.dumps(k['bucket'])}{' dropout' if k['dropout'] else ''}"
                f" {'training' if k['backward'] else 'inference'}")
    except (ValueError, KeyError, TypeError):
        return repr(key[:80])


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``.lock (fcntl.flock, released by closing, so a process that dies
    never leaves it held). Without fcntl (Windows) nothing is locked."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save_entry(key: str, entry: dict) -> None:
    """Add one entry to the cache file, merged with what other processes wrote: under the lock,
    read the file again, add the entry, write it atomically. Other processes' entries join this
    process's in memory too. A cache that cannot be written is warned about once per process."""
    global _warned_write
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read_entries(path, warn=False)
            entries[key] = entry
            _write_atomically(path, dict(format=FORMAT, version=VERSION, entries=entries))
    except OSError as err:
        if not _warned_write:
            log.warning("could not write the autotune cache %s: %s (choices are kept for this process only)",
                        path, err)
            _warned_write = True
        return
    for other, value in entries.items():
        _load_disk().setdefault(other, value)


def _write_atomically(path: Path, data: dict) -> None:
    """JSON to a temporary file beside ``path``, flushed to disk, then renamed over it: a reader
    sees the old file or the new one, never a part."""
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def clear_autotune_cache() -> None:
    """Forget every tuned choice, in this process and on disk."""
    global _disk
    _choices.clear()
    _disk = {}
    path = cache_path()
    if not path.parent.is_dir():
        return
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # a folder where no lock file can be made: unlink unlocked
            stack.enter_context(_locked(path))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------------
def choose(op: str, implementations: Mapping, device: torch.device, args: tuple, dtype: torch.dtype,
           bucket: tuple, dropout: bool, deterministic: Callable[[tuple], tuple]) -> tuple[str, str]:
    """(backend, explanation) for these arguments: a choice made before in this process, one from
    the cache file, or a new measurement. Call only when :func:`enabled` and :func:`may_tune_now`."""
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))
    fast_key = (op, str(device), dtype, bucket, dropout, backward)
    if fast_key not in _choices:
        key = tuning_key(op, device, dtype, bucket, dropout, backward)
        entry = _load_disk().get(key)
        if entry is not None and entry["backend"] in implementations:
            _choices[fast_key] = entry, "from the cache"
        else:
            entry = tune(op, key, implementations, device, args, dtype, deterministic, backward)
            _choices[fast_key] = entry, "measured now"
    entry, where = _choices[fast_key]
    return entry["backend"], describe(entry, where)


def tuning_seconds() -> float:
    """Seconds this process has spent measuring backends (checks and timings) so far."""
    return _tuning_seconds


def tune(op: str, key: str, implementations: Mapping, device: torch.device, args: tuple,
         dtype: torch.dtype, deterministic: Callable[[tuple], tuple], backward: bool) -> dict:
    """Check and time every backend that can run ``args`` (whose compute dtype is ``dtype``: it sets
    the tolerance of the check); returns the cache entry ``{"backend", "times_ms", "excluded"}``."""
    global _tuning_seconds
    started = time.perf_counter()
    try:
        return _tune(op, key, implementations, device, args, dtype, deterministic, backward)
    finally:
        _tuning_seconds += time.perf_counter() - started


def _tune(op: str, key: str, implementations: Mapping, device: torch.device, args: tuple,
          dtype: torch.dtype, deterministic: Callable[[tuple], tuple], backward: bool) -> dict:
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        runnable = {}
        excluded = {}
        for name, impl in implementations.items():
            reason = impl.why_not(*args)
            if reason is None:
                runnable[name] = impl
            else:
                excluded[name] = f"cannot run: {reason}"
        check_name = next((n for n in CHECK_BACKENDS if n in runnable), None)
        times, errors = {}, ({check_name: 0.0} if check_name else {})
        if check_name is not None:
            check_args = deterministic(args)
            expected = _outputs_and_grads(runnable[check_name], check_args, backward)
            for name, impl in runnable.items():
                if name != check_name:
                    try:
                        error = _relative_error(_outputs_and_grads(impl, check_args, backward), expected)
                    except Exception as err:  # noqa: BLE001: a kernel that raises is excluded, not fatal
                        excluded[name] = f"raised {type(err).__name__}: {err}"
                        continue
                    bound = TOLERANCE.get(dtype, 3e-3)
                    if not error <= bound:
                        excluded[name] = f"disagrees with {check_name}: relative error {error:.3g} > {bound:.3g}"
                        continue
                    errors[name] = float(error)
                times[name] = _median_ms(impl, args, backward, device)
    for name, why in excluded.items():
        if why.startswith(("disagrees", "raised")):
            warnings.warn(f"autotune excluded backend {name!r} for {op}: {why}", stacklevel=5)
    if not times:
        raise RuntimeError(f"autotune found no backend that can run {op} correctly here: {excluded}")
    best = min(times, key=times.get)
    entry = dict(backend=best, times_ms={n: round(t, 4) for n, t in times.items()}, excluded=excluded,
                 checked_against=check_name, errors=errors)
    entry["digest"] = entry_digest(key, entry)
    _load_disk()[key] = entry
    _save_entry(key, entry)
    log.info("autotune %s: %s (%s)", op, best, entry)
    return entry


def describe(entry: dict, where: str) -> str:
    """The explain() text of a tuned choice (times in ms, fastest first; excluded backends)."""
    times = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(entry["times_ms"].items(), key=lambda i: i[1]))
    text = f"autotuned ({where}): {times}"
    bad = {n: why for n, why in entry["excluded"].items() if not why.startswith("cannot run")}
    if bad:
        text += "; excluded " + "; ".join(f"{n} ({why})" for n, why in bad.items())
    return text


def _detached_copies(args, requires_grad: bool):
    def copy(a):
        if torch.is_tensor(a):
            return a.detach().clone().requires_grad_(requires_grad and a.is_floating_point())
        if isinstance(a, (tuple, list)):
            return type(a)(copy(x) for x in a)
        return a
    return tuple(copy(a) for a in args)


def _tensors(tree):
    """The tensors in nested tuples and lists, in order."""
    return [t for t in tree_leaves(tree) if torch.is_tensor(t)]


def _outputs_and_grads(impl, args, backward: bool) -> list:
    """The outputs of one call on fresh copies, then (with ``backward``) the gradients of every
    input tensor for a fixed pseudo-random cotangent."""
    leaves = _detached_copies(args, backward)
    with torch.set_grad_enabled(backward):
        outputs = _tensors(impl.run(*leaves))
        results = [o.detach() for o in outputs]
        if backward:
            inputs = [t for t in _tensors(leaves) if t.requires_grad]
            cotangents = [_fixed_cotangent(o) for o in outputs]
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
            results += [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return results


def _fixed_cotangent(t):
    """A deterministic, non-trivial cotangent shaped like t (no random numbers drawn)."""
    n = t.numel()
    return torch.sin(torch.arange(n, device=t.device, dtype=torch.float32) * 0.7).view(t.shape).to(t.dtype)


def _relative_error(got: list, expected: list) -> float:
    worst = 0.0
    for a, b in zip(got, expected):
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            return math.inf
        scale = b.abs().max().clamp_min(1e-6)
        diff = (a - b).abs().max() / scale
        worst = max(worst, diff.item() if torch.isfinite(diff) else math.inf)
    return worst


def _median_ms(impl, args, backward: bool, device: torch.device) -> float:
    leaves = _detached_copies(args, backward)
    inputs = [t for t in _tensors(leaves) if t.requires_grad]

    def call():
        with torch.set_grad_enabled(backward):
            outputs = _tensors(impl.run(*leaves))
            if backward:
                torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs], allow_unused=True)

    call()  # warm-up: caches, allocator, kernel compilation
    samples = []
    for _ in range(TIMED_CALLS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
