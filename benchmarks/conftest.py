"""Benchmark set-up: sizes per device, run metadata, and the results files.

On a GPU the benchmarks run at the paper's sizes; on a CPU-only machine at small sizes (printed at
the start). Every result also goes to benchmarks/results/<date>_<device>_<rev>.json and .md.
"""
import datetime
import json
import platform
import re
import subprocess
import sys
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
                 dtype="bfloat16", rounds=10),
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


@pytest.fixture
def record(benchmark):
    """record(group, variant, tokens=..., flops=..., **extra): store one measured case."""
    def _record(group, variant, tokens=None, **extra):
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        row = dict(group=group, variant=variant, median_s=stats.median, iqr_s=stats.iqr,
                   min_s=stats.min, rounds=stats.rounds, **extra)
        if tokens is not None:
            row["tokens_per_s"] = tokens / stats.median
        if torch.cuda.is_available():
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        benchmark.extra_info.update(row)
        _results.append(row)
    return _record


def pytest_report_header(config):
    kind = _device_type()
    return f"sharnn_fast benchmarks on {device_name()}: model size {MODEL_SIZES[kind]}"


def _table():
    lines = ["| group | variant | median ms | IQR ms | tokens/s | vs baseline | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in _results:
        base = next((r for r in _results if r["group"] == row["group"] and r.get("baseline")), None)
        ratio = f"{base['median_s'] / row['median_s']:.2f}x" if base else ""
        tokens = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else ""
        peak = f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "n/a"
        lines.append(f"| {row['group']} | {row['variant']} | {1e3 * row['median_s']:.1f} | "
                     f"{1e3 * row['iqr_s']:.1f} | {tokens} | {ratio} | {peak} |")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not _results:
        return
    meta = run_metadata()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    stem = RESULTS_DIR / f"{meta['date'][:10]}_{slug}_{meta['git_revision']}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "pytest " + " ".join(session.config.invocation_params.args)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(meta, command=command, results=_results), indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    stem.with_suffix(".md").write_text(f"# Benchmark run\n\n{header}\n- command: `{command}`\n\n"
                                       f"{_table()}\n")
    session.config._sharnn_results_stem = stem


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _results:
        terminalreporter.section("sharnn_fast results (ratio = baseline median / this median)")
        terminalreporter.write_line(_table())
        stem = getattr(config, "_sharnn_results_stem", None)
        if stem is not None:
            terminalreporter.write_line(f"written to {stem}.json and .md")
