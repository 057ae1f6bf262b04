"""Benchmark set-up: sizes per device, the ``bench`` fixture, run metadata and the results files.

Each benchmark is one case (an op or the model at one size, forward or training) whose variants
(backends, the published model, torch.compile) run on the same inputs. ``bench.compare`` times them
interleaved, round after round, and records one row per variant with its median, IQR, rounds,
ratio to the case's baseline and limit (the API: docs/benchmarks.md; the method: harness/timing.py).

On a GPU the benchmarks run at the paper's sizes; on a CPU-only machine at small sizes (printed at
the start). Every run goes to benchmarks/results/<date>_<device>_<rev>.json and .md, and the terminal
shows one compact table at the end. With --benchmark-disable (CI) every variant runs once, untimed.
"""
from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from harness import peaks as machine_peaks
from harness.report import TABLE_LEGEND, limit_seconds, run_table, skipped_text
from harness.timing import Protocol, interleaved
from sharnn_fast._files import write_atomically

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# The independent implementation of the published model lives with the tests, which check it.
sys.path.insert(0, str(ROOT / "tests"))

# Model sizes: the paper's recipe on GPU (memory of 5000 - T earlier positions), a small one on CPU.
MODEL_SIZES = {
    "cuda": dict(ntoken=256, ninp=1024, nhid=4096, nlayers=4, T=1024, B=16, memory=5000 - 1024,
                 dtype="bfloat16"),
    "cpu": dict(ntoken=256, ninp=256, nhid=1024, nlayers=4, T=256, B=8, memory=0, dtype="float32"),
}
# Seconds of timed rounds per case, after warm-up. A model round takes 0.1-2 s on a CPU, so a model
# case gets more; on a GPU the whole run must stay within tools/gpu_check.sh's time limit.
BUDGETS_S = {"cuda": {"op": 4.0, "model": 10.0}, "cpu": {"op": 10.0, "model": 40.0}}
# Calls shorter than this are repeated within one sample (see harness.timing.Protocol).
MIN_SAMPLE_S = {"cuda": 1e-3, "cpu": 2e-3}


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


def pytest_addoption(parser, pluginmanager):
    group = parser.getgroup("sharnn_fast benchmarks")
    # Our own flag under pytest-benchmark's name for the same switch (docs/benchmarks.md, "Why not
    # pytest-benchmark"); where that plugin is installed anyway, its option of this name serves.
    if not pluginmanager.hasplugin("benchmark"):
        group.addoption("--benchmark-disable", action="store_true",
                        help="run every variant once, untimed, and record nothing (CI)")
    group.addoption("--case-budget", type=float, default=None, metavar="SECONDS",
                    help="seconds of timed rounds per case (default: per device and kind of case, "
                         "see BUDGETS_S in benchmarks/conftest.py)")
    group.addoption("--min-rounds", type=int, default=None, metavar="N",
                    help="timed rounds per variant at least, even past the case's budget (default 10, "
                         "see harness/timing.py); tools/gpu_check.sh uses fewer to fit its lease")
    group.addoption("--remeasure-peaks", action="store_true",
                    help="measure this machine's peak rates again instead of using the cached ones")


@dataclass
class Variant:
    """One variant of a case, for :meth:`Bench.compare` when a plain function is not enough.

    run: the function timed, no arguments (its result is ignored).
    size: sizes that differ from the case's (e.g. {"dtype": "float32"} for a float32 baseline).
    work: work that differs from the case's (tokens, flops, bytes, steps per call).
    info: notes shown with the row (e.g. which SDPA kernel ran).
    """

    run: Callable[[], object]
    size: Optional[dict] = None
    work: Optional[dict] = None
    info: Optional[dict] = None


class _Run:
    """This session's rows, machine peaks and results files (rewritten after every case, so a run
    stopped by a timeout still leaves everything it measured)."""

    def __init__(self):
        self.rows, self.skipped = [], []
        self.command = "pytest benchmarks/"
        self.meta = self.stem = self.peaks = self.peaks_source = None
        self.protocol = {}

    def machine_peaks(self, device, remeasure: bool) -> dict:
        if self.peaks is None:
            identity = machine_peaks.machine_identity(device)
            self.peaks, self.peaks_source = machine_peaks.load_or_measure(
                identity, lambda: machine_peaks.measure_peaks(device), remeasure=remeasure)
        return self.peaks

    def add(self, rows, skipped, protocol):
        self.rows += rows
        self.skipped += skipped
        self.protocol = protocol
        self.write()

    def write(self):
        if self.stem is None:
            self.meta = run_metadata()
            slug = re.sub(r"[^A-Za-z0-9]+", "-", self.meta["device"]).strip("-").lower()
            self.stem = RESULTS_DIR / f"{self.meta['date'][:10]}_{slug}_{self.meta['git_revision']}"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        record = dict(self.meta, command=self.command, protocol=self.protocol, peaks=self.peaks,
                      peaks_source=self.peaks_source, results=self.rows, skipped=self.skipped)
        write_atomically(self.stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        header = "\n".join(f"- {k}: {v}" for k, v in self.meta.items())
        write_atomically(self.stem.with_suffix(".md"), (
            f"# Benchmark run\n\n{header}\n- command: `{self.command}`\n- peaks: {self.peaks_source}\n\n"
            f"{self.table()}\n"))

    def table(self) -> str:
        return f"{run_table(self.rows)}\n\n{TABLE_LEGEND}\n\n{skipped_text(self.skipped)}"


_run = _Run()


class Bench:
    """The ``bench`` fixture: ``bench.compare(...)`` times a case's variants interleaved and records
    them; ``bench.timing`` is False under --benchmark-disable (then each variant runs once)."""

    def __init__(self, config, device):
        self.config, self.device = config, device

    @property
    def timing(self) -> bool:
        return not self.config.getoption("benchmark_disable")

    def protocol(self, budget: str) -> Protocol:
        budget_s = self.config.getoption("case_budget", default=None) or BUDGETS_S[self.device.type][budget]
        min_rounds = self.config.getoption("min_rounds", default=None)
        extra = dict(min_rounds=min_rounds) if min_rounds else {}
        return Protocol(budget_s=budget_s, min_sample_s=MIN_SAMPLE_S[self.device.type], **extra)

    def compare(self, group: str, variants: dict, *, baseline: str, size: dict, work: Optional[dict] = None,
                skipped: Optional[dict] = None, budget: str = "op") -> list:
        """Time ``variants`` of the case ``group`` interleaved and record one row per variant.

        variants: {name: function of no arguments, or Variant}; all run on the same inputs.
        baseline: the name of the variant every ratio is against; it must be among ``variants``.
        size: every size of the case and its dtype, e.g. dict(T=64, B=4, d=256, dtype="float32").
        work: per call: ``tokens`` (-> tokens/s), ``flops`` (-> TFLOP/s), ``bytes`` that must move
            at least once, ``steps`` that depend on each other (-> the limit, see harness.report).
        skipped: {name: why it cannot run here}, listed under the table.
        budget: "op" or "model", the time budget of the case (BUDGETS_S; --case-budget overrides).
        Returns the rows (an empty list under --benchmark-disable). Raises ValueError when the
        baseline is not among the variants.
        """
        if baseline not in variants:
            raise ValueError(f"baseline {baseline!r} is not among the variants {list(variants)}")
        if any(row["group"] == group for row in _run.rows):
            raise ValueError(f"case {group!r} was already recorded in this run: every case needs its "
                             f"own name, or its ratios would be taken against another case's baseline")
        variants = {name: v if isinstance(v, Variant) else Variant(v) for name, v in variants.items()}
        skipped = [dict(group=group, variant=name, reason=reason) for name, reason in (skipped or {}).items()]
        # One first call of each variant (measuring peak memory on CUDA). A variant that raises is
        # listed as FAILED with its error and the others are still timed; the case then fails.
        memory, failed = self._first_calls(variants)
        skipped += [dict(group=group, variant=name, reason=f"FAILED: {error}") for name, error in failed.items()]
        if not self.timing or baseline in failed:
            _fail_variants(group, failed)
            return []
        variants = {name: v for name, v in variants.items() if name not in failed}
        protocol = self.protocol(budget)
        timings, stopped = interleaved({name: v.run for name, v in variants.items()}, protocol,
                                       sync=lambda: synchronize(self.device))
        rows = []
        for name, variant in variants.items():
            spread = timings[name].spread
            row_size = dict(size, **(variant.size or {}))
            row_work = dict(work or {}, **(variant.work or {}))
            row = dict(group=group, variant=name, baseline=name == baseline, size=row_size,
                       median_s=spread.median, q1_s=spread.q1, q3_s=spread.q3, iqr_s=spread.iqr,
                       rounds=spread.rounds, iterations=timings[name].iterations, stopped=stopped)
            if row_work.get("tokens"):
                row["tokens_per_s"] = row_work["tokens"] / spread.median
            if row_work.get("flops"):
                row["tflops"] = row_work["flops"] / spread.median / 1e12
            if row_work.get("steps"):
                row["steps"] = row_work["steps"]
            if any(row_work.get(k) for k in ("flops", "bytes", "steps")):
                peaks = _run.machine_peaks(self.device, self.config.getoption("remeasure_peaks", default=False))
                row["limit_s"] = limit_seconds(peaks, row_size.get("dtype"), flops=row_work.get("flops"),
                                               bytes=row_work.get("bytes"), steps=row_work.get("steps"))
            if name in memory:
                row["peak_memory_gib"] = memory[name]
            if variant.info:
                row["info"] = dict(variant.info)
            rows.append(row)
        _run.add(rows, skipped, dict(interleaved=True, warmup_rounds=protocol.warmup_rounds,
                                     min_rounds=protocol.min_rounds, max_rounds=protocol.max_rounds,
                                     target_rel_ci=protocol.target_rel_ci,
                                     budgets_s=BUDGETS_S[self.device.type],
                                     case_budget_s=self.config.getoption("case_budget", default=None)))
        _fail_variants(group, failed)
        return rows

    def _first_calls(self, variants) -> tuple[dict, dict]:
        """Call each variant once: ({name: GiB allocated at most by the call, on CUDA},
        {name: the error of a variant that raised, one line})."""
        memory, failed = {}, {}
        for name, variant in variants.items():
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                variant.run()
                synchronize(self.device)
            except Exception as err:  # reported with the case, which then fails
                failed[name] = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
                continue
            if self.device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return memory, failed


def _fail_variants(group: str, failed: dict) -> None:
    if failed:
        pytest.fail(f"{group}: " + "; ".join(f"{name} raised {error}" for name, error in failed.items()),
                    pytrace=False)


@pytest.fixture
def bench(request, device):
    return Bench(request.config, device)


def pytest_report_header(config):
    kind = _device_type()
    return f"sharnn_fast benchmarks on {device_name()}: model size {MODEL_SIZES[kind]}"


def pytest_configure(config):
    _run.command = shlex.join(["pytest", *config.invocation_params.args])


def pytest_runtest_logreport(report):
    """Print a failure the moment it happens: a run cut short by a time cap (tools/gpu_check.sh caps
    each benchmark file) would otherwise lose it, since pytest prints failures at the end."""
    if report.failed:
        sys.stderr.write(f"\n---- FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
        sys.stderr.flush()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _run.rows:
        terminalreporter.section("sharnn_fast results (ratio = baseline median / variant median)")
        terminalreporter.write_line(f"{_run.meta['device']}, git {_run.meta['git_revision']}; "
                                    f"peaks {_run.peaks_source}")
        terminalreporter.write_line(_run.table())
        terminalreporter.write_line(f"written to {_run.stem}.json and .md")
