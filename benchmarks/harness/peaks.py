"""This machine's peak rates, from which every case's "limit" is computed, measured once per
machine and cached.

A peak is the best of many trials (the highest rate, the shortest step), at several sizes, because
interference from other processes can only make a trial slower: the maximum over trials is the
estimate least affected by load. The measurement runs once per machine identity (host, processor or GPU, thread
count, torch and CUDA versions) and is stored in a JSON cache, by default
``$XDG_CACHE_HOME/sharnn_fast/benchmark_peaks.json`` (``~/.cache/...``); the environment variable
``SHARNN_BENCH_PEAKS`` names another file. ``pytest benchmarks/ --remeasure-peaks`` measures again
(best done on a quiet machine) and keeps, rate by rate, the better of the two measurements; delete
the file to start afresh.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from sharnn_fast._files import write_atomically
from sharnn_fast.autotuning import cpu_name

CACHE_ENV = "SHARNN_BENCH_PEAKS"
CACHE_FORMAT = 1


def cache_path() -> Path:
    """The peaks cache file: ``$SHARNN_BENCH_PEAKS`` if set, else in the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sharnn_fast" / "benchmark_peaks.json"


def machine_identity(device) -> dict:
    """What the peaks depend on: host, processor, logical CPUs and torch threads; on CUDA the GPU
    and its compute capability; the torch and CUDA versions (their BLAS libraries set the matrix rate)."""
    import torch

    identity = dict(host=platform.node(), cpu=cpu_name(), logical_cpus=os.cpu_count(),
                    torch_threads=torch.get_num_threads(), torch=torch.__version__, cuda=torch.version.cuda,
                    device=device.type)
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
        identity["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return identity


def _read_cache(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return []  # unreadable or corrupt: measured again and rewritten
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return []
    return [e for e in data.get("entries", []) if isinstance(e, dict) and "identity" in e]


def best_peaks(first: dict, second: dict) -> dict:
    """The better of two measurements of the same machine, rate by rate: other load can only
    lower a measured rate, so measuring again never makes a peak worse."""
    rates = dict(first["matmul_tflops"])
    for dtype, rate in second["matmul_tflops"].items():
        rates[dtype] = max(rate, rates.get(dtype, 0.0))
    return dict(matmul_tflops=rates, copy_gb_per_s=max(first["copy_gb_per_s"], second["copy_gb_per_s"]),
                step_latency_us=min(first["step_latency_us"], second["step_latency_us"]),
                trials=first.get("trials", 0) + second.get("trials", 0))


def load_or_measure(identity: dict, measure: Callable[[], dict], *, path: Path | None = None,
                    remeasure: bool = False) -> tuple[dict, str]:
    """The cached peaks of the machine ``identity``, or ``measure()``'s, then cached.

    Returns (peaks, where they came from: "cached <date> in <path>" or "measured now, cached in
    <path>"). With ``remeasure`` the new measurement is combined with the cached one by
    :func:`best_peaks`. Entries for other identities are kept. A cache that cannot be written is reported in
    the second value, and the measured peaks are still returned.
    """
    path = path or cache_path()
    entries = _read_cache(path)
    if not remeasure:
        for entry in entries:
            if entry["identity"] == identity:
                return entry["peaks"], f"cached {entry.get('measured', '?')} in {path}"
    peaks = measure()
    previous = next((e for e in entries if e["identity"] == identity), None)
    if previous is not None:
        peaks = best_peaks(previous["peaks"], peaks)
    measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = [e for e in entries if e["identity"] != identity]
    entries.append(dict(identity=identity, measured=measured, peaks=peaks))
    try:
        write_atomically(path, json.dumps(dict(format=CACHE_FORMAT, entries=entries), indent=1) + "\n")
    except OSError as err:
        return peaks, f"measured now; not cached ({path}: {err.strerror or err})"
    return peaks, f"measured now, cached in {path}"


def best_time(function: Callable[[], object], trials: int, sync: Callable[[], None],
              min_seconds: float = 1.0, max_trials: int = 2000) -> float:
    """The shortest of at least ``trials`` timed calls, after one untimed call. Short calls go on
    until ``min_seconds`` have passed (at most ``max_trials`` calls): the more short trials, the
    likelier one falls in a quiet moment of a shared machine."""
    function()
    sync()
    best, count, started = float("inf"), 0, time.perf_counter()
    while count < trials or (time.perf_counter() - started < min_seconds and count < max_trials):
        start = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - start)
        count += 1
    return best


# Per device: matrix sizes and dtypes for the matrix rate, tensor sizes (elements) for the copy
# bandwidth, and trials of each. Several sizes, because the best rate is not reached at the largest:
# on a CPU a product that stays in cache runs about twice as fast as one that streams from memory,
# and a case's small products can too.
PEAK_SETTINGS = {
    "cuda": dict(sizes=(4096, 8192), dtypes=("bfloat16", "float16", "float32"), copy_numels=(2**24, 2**28),
                 trials=30),
    "cpu": dict(sizes=(512, 1024, 2048), dtypes=("float32",), copy_numels=(2**20, 2**25), trials=20),
}
CHAIN_STEPS = 200


def measure_peaks(device) -> dict:
    """Measure this machine's peaks (see the module docstring for the method), each the best over
    the sizes in PEAK_SETTINGS and their trials:

    - ``matmul_tflops``: {dtype: dense n x n matrix product rate} (2 n^3 FLOPs per product).
    - ``copy_gb_per_s``: bytes read plus bytes written per second by a tensor copy.
    - ``step_latency_us``: the shortest dependent step: one tiny in-place add after another (on
      CUDA replayed from a CUDA graph, so it is the device's latency, not Python's).
    """
    import torch

    settings = PEAK_SETTINGS[device.type]
    trials = settings["trials"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    matmul = {}
    for dtype_name in settings["dtypes"]:
        for n in settings["sizes"]:
            a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
            b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
            rate = 2 * n**3 / best_time(lambda: a @ b, trials, sync) / 1e12
            matmul[dtype_name] = max(rate, matmul.get(dtype_name, 0.0))
            del a, b
    copy_gb_per_s = 0.0
    for numel in settings["copy_numels"]:
        source = torch.empty(numel, device=device, dtype=torch.float32)
        target = torch.empty_like(source)
        copy_s = best_time(lambda: target.copy_(source), trials, sync)
        copy_gb_per_s = max(copy_gb_per_s, 2 * source.numel() * source.element_size() / copy_s / 1e9)
        del source, target

    tiny = torch.zeros(1, device=device)

    def chain():
        for _ in range(CHAIN_STEPS):
            tiny.add_(1.0)
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        chain()  # one eager run first, as graph capture requires
        with torch.cuda.graph(graph):
            chain()
        step_s = best_time(graph.replay, trials, sync) / CHAIN_STEPS
    else:
        step_s = best_time(chain, trials, sync) / CHAIN_STEPS
    return dict(matmul_tflops=matmul, copy_gb_per_s=copy_gb_per_s, step_latency_us=step_s * 1e6,
                trials=trials)
