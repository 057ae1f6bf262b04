"""Interleaved timing of the variants of one case, and the statistics reported for them.

The variants of a case (e.g. backends "torch" and "reference" on the same inputs) are timed in
rounds: every round runs each variant once, and the order rotates from round to round (A B C, then
B C A, then C A B, ...). Slow drift and bursts of load from other processes then hit every variant
alike, so their ratio stays meaningful on a busy machine where the absolute times do not.

Every variant first runs ``warmup_rounds`` untimed rounds (caches, allocator, lazy kernel
compilation, CUDA graph capture). Rounds then continue until every variant's median is stable (the
95% confidence interval of the median, from order statistics, is narrower than ``target_rel_ci`` of
the median) or the case's time budget is spent, but never fewer than ``min_rounds`` or more than
``max_rounds``.

Significance: a ratio between two variants counts only when their interquartile ranges do not
overlap; otherwise the difference is within the noise and is reported as "not significant".
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a variant's times, in seconds per call, over ``rounds`` samples."""

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(times) -> Spread:
    """Median, first and third quartile (inclusive method: the quartiles lie within the data) of
    ``times``. Raises ValueError for an empty sequence."""
    ordered = sorted(times)
    if not ordered:
        raise ValueError("summarize needs at least one time")
    if len(ordered) == 1:
        return Spread(ordered[0], ordered[0], ordered[0], 1)
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Spread(median, q1, q3, len(ordered))


def median_interval(times, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (about 95% for z = 1.96): the order
    statistics at ranks n/2 -+ z sqrt(n)/2, the normal approximation of the binomial count of
    samples below the median. Below 6 samples it is the whole range."""
    ordered = sorted(times)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one time")
    if n < 6:
        return ordered[0], ordered[-1]
    half_width = z * math.sqrt(n) / 2
    low = max(math.floor(n / 2 - half_width), 1)
    high = min(math.ceil(n / 2 + half_width) + 1, n)
    return ordered[low - 1], ordered[high - 1]


def median_is_stable(times, target_rel_ci: float) -> bool:
    """True when the median's confidence interval is at most ``target_rel_ci`` of the median."""
    low, high = median_interval(times)
    return high - low <= target_rel_ci * statistics.median(times)


@dataclass(frozen=True)
class Ratio:
    """``value`` = baseline median / variant median (above 1: the variant is faster).
    ``significant`` is False when the two interquartile ranges overlap."""

    value: float
    significant: bool

    def __str__(self) -> str:
        return f"{self.value:.2f}x" + ("" if self.significant else " (not significant)")


def compare(baseline: Spread, variant: Spread) -> Ratio:
    """The speedup of ``variant`` over ``baseline``, significant only if their IQRs are disjoint."""
    overlap = variant.q1 <= baseline.q3 and baseline.q1 <= variant.q3
    return Ratio(baseline.median / variant.median, not overlap)


@dataclass
class Timing:
    """What :func:`interleaved` measured for one variant: seconds per call for every timed round,
    and how many calls each sample averages."""

    times: list = field(default_factory=list)
    iterations: int = 1

    @property
    def spread(self) -> Spread:
        return summarize(self.times)


@dataclass(frozen=True)
class Protocol:
    """How long and how often a case is timed (see the module docstring)."""

    budget_s: float = 10.0
    warmup_rounds: int = 2
    min_rounds: int = 10
    max_rounds: int = 1000
    target_rel_ci: float = 0.02
    # A sample shorter than this repeats the call and averages, so that timer resolution and the
    # cost of reading the clock stay negligible against what is measured.
    min_sample_s: float = 1e-3

    def __post_init__(self):
        if self.budget_s <= 0 or self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise ValueError(f"Protocol needs budget_s > 0 and 1 <= min_rounds <= max_rounds, got {self}")


def round_order(names: list, round_index: int) -> list:
    """The order of the variants in round ``round_index``: rotated by one each round, so every
    variant takes every position (first after the others, last before the next round) equally often."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved(variants: Mapping[str, Callable[[], object]], protocol: Protocol = Protocol(), *,
                sync: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Timing], str]:
    """Time ``variants`` (name -> function of no arguments) in interleaved rounds.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU) and is called
    before a sample's clock stops. Returns ({name: Timing}, why it stopped: "stable", "budget" or
    "max rounds"). Raises ValueError without variants.
    """
    names = list(variants)
    if not names:
        raise ValueError("interleaved needs at least one variant")
    timings = {name: Timing() for name in names}

    def sample(name: str) -> float:
        function, iterations = variants[name], timings[name].iterations
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection triggered by one variant's garbage must not land in another's time
        try:
            start = clock()
            for _ in range(iterations):
                function()
            sync()
            return (clock() - start) / iterations
        finally:
            if gc_was_enabled:
                gc.enable()

    warm = {}
    for round_index in range(protocol.warmup_rounds):
        for name in round_order(names, round_index):
            warm[name] = sample(name)
    for name in names:  # from the last warm-up, which no longer pays one-time costs
        if name in warm and warm[name] > 0:
            timings[name].iterations = max(1, math.ceil(protocol.min_sample_s / warm[name]))

    started = clock()
    rounds = 0
    while True:
        for name in round_order(names, rounds):
            timings[name].times.append(sample(name))
        rounds += 1
        if rounds >= protocol.max_rounds:
            return timings, "max rounds"
        if rounds >= protocol.min_rounds:
            if all(median_is_stable(t.times, protocol.target_rel_ci) for t in timings.values()):
                return timings, "stable"
            if clock() - started >= protocol.budget_s:
                return timings, "budget"
