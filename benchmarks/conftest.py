"""Benchmark set-up: sizes per device, run metadata, and the results files.

On a GPU the benchmarks run at the paper's sizes; on a CPU-only machine at small sizes (printed at
the start). Every result also goes to benchmarks/results/<date>_<device>_<rev>.json and .md.
"""
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# The independent implementation of the published model lives with the tests, which check it.
sys.path.insert(0, str(ROOT / "tests"))

# Model sizes: the paper's recipe on GPU (memory of 5000 - T earlier positions), a small one on CPU.
MODEL_SIZES = {
    "cuda": dict(ntoken=256, ninp=1024, nhid=4096, nlayers=4, T=1024, B=16, memory=5000 - 1024,
                 dtype="bfloat16", rounds=5),
    "cpu": dict(ntoken=256, ninp=256, nhid=1024, nlayers=4, T=256, B=8, memory=0,
                dtype="float32", rounds=8),
}

_results = []


def _device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device():
    return torch.device(_device_type())


@pytest.fixture(scope="session")
def model_size(device):
    return MODEL_SIZES[device.type]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device=None):
    if (device or torch.device(_device_type())).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_metadata():
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton_version, python=platform.python_version(), git_revision=rev,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _median_time(fn, repeats, device):
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture(scope="session")
def peaks(device):
    """This machine's measured peak rates, for the "limit" of each result: the time its work
    would take at the dense matrix rate, at the copy bandwidth, or at one minimal dependent step
    per sequential step (a recurrence cannot beat that latency)."""
    if device.type == "cuda":
        n, dtype, repeats, copy_numel = 8192, torch.bfloat16, 20, 2**28
    else:
        n, dtype, repeats, copy_numel = 2048, torch.float32, 3, 2**25
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = _median_time(lambda: a @ b, repeats, device)
    src = torch.empty(copy_numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src), repeats, device)
    tiny = torch.zeros(1, device=device)
    steps = 200

    def chain():
        for _ in range(steps):
            tiny.add_(1.0)
    if device.type == "cuda":  # replay from a CUDA graph: the device's latency, not Python's
        graph = torch.cuda.CUDAGraph()
        chain()
        with torch.cuda.graph(graph):
            chain()
        step_s = _median_time(graph.replay, repeats, device) / steps
    else:
        step_s = _median_time(chain, repeats, device) / steps
    return dict(matmul_dtype=str(dtype).replace("torch.", ""), matmul_tflops=2 * n**3 / matmul_s / 1e12,
                copy_gb_per_s=2 * src.numel() * 4 / copy_s / 1e9, step_latency_us=step_s * 1e6)


@pytest.fixture
def record(benchmark, request):
    """record(group, variant, tokens=, flops=, bytes=, steps=, baseline=, **extra): store one
    measured case. flops, bytes (moved to and from memory at least once) and steps (sequential
    dependent steps) give TFLOP/s and the case's physical limit."""
    def _record(group, variant, tokens=None, flops=None, bytes=None, steps=None, **extra):
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        row = dict(group=group, variant=variant, median_s=stats.median, iqr_s=stats.iqr,
                   min_s=stats.min, rounds=stats.rounds, **extra)
        if tokens is not None:
            row["tokens_per_s"] = tokens / stats.median
        if flops is not None:
            row["tflops"] = flops / stats.median / 1e12
        if flops is not None or bytes is not None or steps is not None:
            peak = request.getfixturevalue("peaks")
            row["peaks"] = peak
            row["limit_s"] = max(flops / (peak["matmul_tflops"] * 1e12) if flops else 0.0,
                                 bytes / (peak["copy_gb_per_s"] * 1e9) if bytes else 0.0,
                                 steps * peak["step_latency_us"] * 1e-6 if steps else 0.0)
        if torch.cuda.is_available():
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        benchmark.extra_info.update(row)
        _results.append(row)
        _write_results()
    return _record


def pytest_report_header(config):
    kind = _device_type()
    return f"sharnn_fast benchmarks on {device_name()}: model size {MODEL_SIZES[kind]}"


def results_table(results):
    """Markdown table of result rows; speedups are against the row of the same group marked
    baseline, and "limit" is the time at this machine's measured peak rates (see `peaks`)."""
    lines = ["| group | variant | median ms | IQR ms | tokens/s | TFLOP/s | vs baseline | limit ms "
             "| % of limit | peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        base = next((r for r in results if r["group"] == row["group"] and r.get("baseline")), None)
        cells = [row["group"], row["variant"], f"{1e3 * row['median_s']:.2f}", f"{1e3 * row['iqr_s']:.2f}",
                 f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "",
                 f"{row['tflops']:.2f}" if "tflops" in row else "",
                 f"{base['median_s'] / row['median_s']:.2f}x" if base else "",
                 f"{1e3 * row['limit_s']:.2f}" if "limit_s" in row else "",
                 f"{100 * row['limit_s'] / row['median_s']:.0f}%" if "limit_s" in row else "",
                 f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_run = {}  # metadata, command and file stem of this session, fixed at its first result


def pytest_configure(config):
    _run["command"] = "pytest " + " ".join(config.invocation_params.args)


def _write_results():
    """Rewrite this run's JSON and markdown after every result, so a run stopped by a timeout
    still leaves everything it measured."""
    if "stem" not in _run:
        _run["meta"] = run_metadata()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", _run["meta"]["device"]).strip("-").lower()
        _run["stem"] = RESULTS_DIR / f"{_run['meta']['date'][:10]}_{slug}_{_run['meta']['git_revision']}"
    meta, stem, command = _run["meta"], _run["stem"], _run.get("command", "pytest benchmarks/")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, command=command, results=_results),
                                                    indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    stem.with_suffix(".md").write_text(f"# Benchmark run\n\n{header}\n- command: `{command}`\n\n"
                                       f"{results_table(_results)}\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _results:
        terminalreporter.section("sharnn_fast results (ratio = baseline median / this median)")
        terminalreporter.write_line(results_table(_results))
        terminalreporter.write_line(f"written to {_run['stem']}.json and .md")
