"""The benchmark harness (benchmarks/harness, benchmarks/render_results.py): statistics, significance,
interleaving, the stopping rule, the limit flag, the peaks cache and a renderer that never mixes runs.
Timing is checked with a fake clock, so these tests are exact and fast."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import render_results  # noqa: E402
from harness import peaks, report, timing  # noqa: E402


class FakeClock:
    """A clock that only moves when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


def workload(clock, calls, name, cost):
    """A variant that records its call and spends cost(now) seconds of fake time."""
    def run():
        calls.append(name)
        clock.spend(cost(clock.now))
    return run


# Statistics and significance

def test_summarize_gives_median_quartiles_and_rounds():
    spread = timing.summarize([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (spread.median, spread.q1, spread.q3, spread.rounds) == (5, 3, 7, 9)
    assert spread.iqr == 4
    assert timing.summarize([0.5]) == timing.Spread(0.5, 0.5, 0.5, 1)
    with pytest.raises(ValueError, match="at least one"):
        timing.summarize([])


def test_median_interval_contains_the_median_and_narrows_with_more_samples():
    few = [float(i) for i in range(20)]
    many = [float(i) / 10 for i in range(200)]  # the same range, ten times the samples
    low, high = timing.median_interval(few)
    assert low <= 9.5 <= high
    low_many, high_many = timing.median_interval(many)
    assert low_many <= 9.95 <= high_many
    assert high_many - low_many < high - low
    assert timing.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few samples: the whole range


def test_ratio_is_significant_only_when_the_iqrs_are_disjoint():
    base = timing.Spread(median=10.0, q1=9.0, q3=11.0, rounds=20)
    faster = timing.Spread(median=5.0, q1=4.5, q3=5.5, rounds=20)
    overlapping = timing.Spread(median=9.5, q1=8.0, q3=9.2, rounds=20)
    ratio = timing.compare(base, faster)
    assert ratio.value == pytest.approx(2.0) and ratio.significant
    assert str(ratio) == "2.00x"
    close = timing.compare(base, overlapping)
    assert not close.significant
    assert str(close) == f"{10.0 / 9.5:.2f}x (not significant)"
    touching = timing.Spread(median=12.0, q1=11.0, q3=13.0, rounds=20)  # shares the value 11
    assert not timing.compare(base, touching).significant


# Interleaving and the stopping rule

def test_rounds_rotate_so_every_variant_takes_every_position():
    names = ["a", "b", "c"]
    orders = [timing.round_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(order[position] for order in orders) == names


def test_variants_run_interleaved_after_warm_up():
    clock, calls = FakeClock(), []
    variants = {"a": workload(clock, calls, "a", lambda now: 1.0),
                "b": workload(clock, calls, "b", lambda now: 1.0)}
    protocol = timing.Protocol(budget_s=1e9, warmup_rounds=2, min_rounds=6, max_rounds=6, min_sample_s=0)
    timings, stopped = timing.interleaved(variants, protocol, clock=clock)
    assert calls == ["a", "b", "b", "a"] + ["a", "b", "b", "a"] * 3  # 2 warm-up rounds, then 6 timed
    assert [len(timings[n].times) for n in "ab"] == [6, 6]
    assert stopped in ("stable", "max rounds")


def test_interleaving_keeps_the_ratio_under_drifting_load():
    """The machine gets three times slower during the run; b always costs twice a. Timed one after
    the other, b would look far slower than 2x; interleaved, the ratio stays 2."""
    clock, calls = FakeClock(), []

    def load(now):
        return 1.0 + 2.0 * min(now / 200.0, 1.0)
    variants = {"a": workload(clock, calls, "a", lambda now: 1.0 * load(now)),
                "b": workload(clock, calls, "b", lambda now: 2.0 * load(now))}
    protocol = timing.Protocol(budget_s=1e9, min_rounds=60, max_rounds=60, min_sample_s=0)
    timings, _ = timing.interleaved(variants, protocol, clock=clock)
    ratio = timing.compare(timings["a"].spread, timings["b"].spread)
    assert ratio.value == pytest.approx(0.5, rel=0.05)

    clock, sequential = FakeClock(), {}
    for name, cost in (("a", 1.0), ("b", 2.0)):  # what timing one variant after the other sees
        alone = {name: workload(clock, calls, name, lambda now, c=cost: c * load(now))}
        sequential[name] = timing.interleaved(alone, protocol, clock=clock)[0][name].spread
    assert timing.compare(sequential["a"], sequential["b"]).value < 0.45


def test_stops_when_the_median_is_stable():
    clock, calls = FakeClock(), []
    variants = {"a": workload(clock, calls, "a", lambda now: 1.0),
                "b": workload(clock, calls, "b", lambda now: 3.0)}
    protocol = timing.Protocol(budget_s=1e9, min_rounds=10, max_rounds=1000, min_sample_s=0)
    timings, stopped = timing.interleaved(variants, protocol, clock=clock)
    assert stopped == "stable"
    assert len(timings["a"].times) == 10  # constant times are stable as soon as allowed


def test_stops_at_the_budget_when_the_median_is_not_stable_but_not_before_min_rounds():
    clock, calls = FakeClock(), []
    noise = iter([1.0, 5.0, 2.0, 9.0, 3.0, 7.0] * 1000)
    variants = {"a": workload(clock, calls, "a", lambda now: next(noise))}
    protocol = timing.Protocol(budget_s=100.0, warmup_rounds=1, min_rounds=5, max_rounds=1000, min_sample_s=0)
    timings, stopped = timing.interleaved(variants, protocol, clock=clock)
    assert stopped == "budget"
    rounds = len(timings["a"].times)
    assert rounds >= 5 and sum(timings["a"].times) >= 100.0
    assert sum(timings["a"].times[:-1]) < 100.0  # stopped at the first round past the budget

    protocol = timing.Protocol(budget_s=1e-9, warmup_rounds=0, min_rounds=7, max_rounds=1000, min_sample_s=0)
    timings, stopped = timing.interleaved(variants, protocol, clock=clock)
    assert stopped == "budget" and len(timings["a"].times) == 7


def test_short_calls_are_repeated_within_a_sample_and_synced_once_per_sample():
    clock, calls, syncs = FakeClock(), [], []
    variants = {"fast": workload(clock, calls, "fast", lambda now: 1e-5)}
    protocol = timing.Protocol(budget_s=1e9, warmup_rounds=1, min_rounds=3, max_rounds=3, min_sample_s=1e-3)
    timings, _ = timing.interleaved(variants, protocol, clock=clock, sync=lambda: syncs.append(1))
    assert timings["fast"].iterations == 100
    assert timings["fast"].times == pytest.approx([1e-5] * 3)
    assert len(calls) == 1 + 3 * 100 and len(syncs) == 1 + 3


def test_protocol_and_interleaved_reject_bad_settings():
    with pytest.raises(ValueError, match="min_rounds"):
        timing.Protocol(min_rounds=10, max_rounds=5)
    with pytest.raises(ValueError, match="at least one variant"):
        timing.interleaved({})


# The limit and the table

PEAKS = dict(matmul_tflops={"float32": 1.0, "bfloat16": 4.0}, copy_gb_per_s=100.0, step_latency_us=2.0)


def test_limit_is_the_largest_of_the_bounds_at_the_case_dtype():
    assert report.limit_seconds(PEAKS, "float32", flops=2e12) == pytest.approx(2.0)
    assert report.limit_seconds(PEAKS, "bfloat16", flops=2e12) == pytest.approx(0.5)
    assert report.limit_seconds(PEAKS, "float16", flops=2e12) == pytest.approx(0.5)  # fastest measured rate
    assert report.limit_seconds(PEAKS, "float32", flops=1e9, bytes=1e9, steps=10) == pytest.approx(0.01)
    assert report.limit_seconds(PEAKS, "float32", flops=1e9, steps=10**6) == pytest.approx(2.0)
    assert report.limit_seconds(PEAKS, "float32") is None
    legacy = dict(matmul_dtype="float32", matmul_tflops=1.0, copy_gb_per_s=100.0, step_latency_us=2.0)
    assert report.limit_seconds(legacy, "float32", flops=1e12) == pytest.approx(1.0)


def test_a_case_faster_than_its_limit_is_flagged_never_above_100_percent():
    assert report.limit_text(0.5, 1.0) == "50%"
    assert report.limit_text(1.0, 1.0) == "100%"
    assert report.limit_text(1.4, 1.0) == report.UNDERESTIMATED == "limit underestimated"
    assert report.limit_text(None, 1.0) == ""
    for limit in (0.1, 0.99, 1.0, 1.01, 3.0):
        text = report.limit_text(limit, 1.0)
        assert text == report.UNDERESTIMATED or int(text.rstrip("%")) <= 100


def row(group, variant, median, baseline=False, spread=0.01, **extra):
    return dict(group=group, variant=variant, baseline=baseline, median_s=median, q1_s=median - spread,
                q3_s=median + spread, iqr_s=2 * spread, rounds=20,
                size=dict(T=64, B=4, d=256, F=1024, dtype="float32"), **extra)


def test_every_row_shows_all_sizes_and_its_ratio():
    table = report.run_table([row("boom forward", "reference", 2.0), row("boom forward", "torch", 1.0, True)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| torch |" in lines[2] and "| baseline |" in lines[2]  # the baseline first
    assert "T 64, B 4, d 256, F 1024, float32" in lines[2] and "T 64, B 4, d 256, F 1024, float32" in lines[3]
    assert "| 0.50x |" in lines[3]
    assert report.size_text(dict(ninp=256, nlayers=4, T=8, dtype="bfloat16")) == "emsize 256, layers 4, T 8, bfloat16"
    unstable = report.run_table([row("g", "torch", 1.0, True, stopped="budget"), row("g", "x", 1.0, stopped="budget")])
    assert unstable.count("before every median was stable") == 1  # said once per case


def test_a_row_without_a_baseline_in_its_run_gets_no_ratio():
    rows = [row("model", "torch+compile", 0.5)]
    assert report.ratio_to_baseline(rows[0], rows) is None
    assert "no baseline in this run" in report.run_table(rows)


def test_legacy_rows_without_quartiles_use_the_iqr_around_the_median():
    legacy = dict(group="g", variant="v", median_s=1.0, iqr_s=0.2, rounds=5)
    assert report.spread_of(legacy) == timing.Spread(1.0, 0.9, 1.1, 5)


# The peaks cache

def test_peaks_are_measured_once_per_machine_and_reused(tmp_path):
    path, measured = tmp_path / "peaks.json", []

    def measure():
        measured.append(1)
        return dict(PEAKS, trials=3)
    machine = dict(host="h", cpu="c")
    first, source = peaks.load_or_measure(machine, measure, path=path)
    assert measured == [1] and "measured now" in source
    again, source = peaks.load_or_measure(machine, measure, path=path)
    assert measured == [1] and again == first and source.startswith("cached")
    other, _ = peaks.load_or_measure(dict(host="h", cpu="other"), measure, path=path)
    assert measured == [1, 1]
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_remeasuring_keeps_the_best_of_both_measurements(tmp_path):
    path, machine = tmp_path / "peaks.json", dict(host="h")
    peaks.load_or_measure(machine, lambda: dict(PEAKS, trials=3), path=path)
    slower = dict(matmul_tflops={"float32": 0.5, "bfloat16": 5.0}, copy_gb_per_s=50.0, step_latency_us=1.0,
                  trials=3)
    best, source = peaks.load_or_measure(machine, lambda: slower, path=path, remeasure=True)
    assert best == dict(matmul_tflops={"float32": 1.0, "bfloat16": 5.0}, copy_gb_per_s=100.0,
                        step_latency_us=1.0, trials=6)
    assert peaks.load_or_measure(machine, lambda: pytest.fail("measured again"), path=path)[0] == best


def test_peak_trials_take_the_best_and_repeat_short_calls():
    calls = []
    assert peaks.best_time(lambda: calls.append(1), 3, lambda: None, min_seconds=0) >= 0
    assert len(calls) == 1 + 3  # one untimed call, then the trials
    calls.clear()
    peaks.best_time(lambda: calls.append(1), 3, lambda: None, min_seconds=10.0, max_trials=50)
    assert len(calls) == 1 + 50  # short calls go on, up to max_trials


def test_a_corrupt_cache_is_measured_again_and_the_cache_path_can_be_overridden(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere" / "peaks.json"
    monkeypatch.setenv(peaks.CACHE_ENV, str(path))
    assert peaks.cache_path() == path
    path.parent.mkdir()
    path.write_text("{not json")
    result, source = peaks.load_or_measure(dict(host="h"), lambda: dict(PEAKS, trials=1))
    assert result["copy_gb_per_s"] == 100.0 and str(path) in source
    assert json.loads(path.read_text())["format"] == peaks.CACHE_FORMAT


# The renderer

def write_run(directory, name, date, rows, device="CPU test x2 threads", command="pytest benchmarks/"):
    record = dict(device=device, torch="2.13", cuda=None, triton=None, python="3.11", git_revision=name,
                  date=date, command=command, protocol=dict(interleaved=True, warmup_rounds=2, min_rounds=10,
                                                            max_rounds=1000, target_rel_ci=0.02),
                  results=rows, skipped=[])
    (directory / f"{date[:10]}_{name}.json").write_text(json.dumps(record))


README_TEXT = ("# project\n\nintro\n\n" + render_results.HEADLINE_START + "\nhand-written, to be replaced\n"
               + render_results.HEADLINE_END + "\n\nmore text\n")


def render(tmp_path, plots=False):
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(README_TEXT)
    messages = render_results.render(tmp_path, tmp_path / "RESULTS.md", readme, plots=plots)
    return (tmp_path / "RESULTS.md").read_text(), readme.read_text(), messages


def section(text, revision):
    """The RESULTS.md section of the run at ``revision``."""
    start = text.index(f"git {revision},")
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else None]


def test_renderer_never_takes_a_ratio_across_runs(tmp_path):
    group = "model train step (single attention)"
    write_run(tmp_path, "old", "2026-11-01T00:00:00+00:00",
              [row(group, "published", 1.0, True), row(group, "torch+compile", 0.5)])
    # A later run without the compiled variant (-k "not compile") and a much slower baseline.
    write_run(tmp_path, "new", "2026-11-02T00:00:00+00:00",
              [row(group, "published", 4.0, True), row(group, "torch", 2.0)])
    results, readme, _ = render(tmp_path)
    old, new = section(results, "old"), section(results, "new")
    assert "torch+compile" in old and "| 2.00x |" in old  # against its own run's baseline
    assert "torch+compile" not in new  # not carried into the newer run
    assert "| 2.00x |" in new and "4.00x" not in results and "8.00x" not in results
    assert results.index("git new,") < results.index("git old,")  # newest first


def test_headline_comes_from_the_newest_model_run_and_only_replaces_the_marked_block(tmp_path):
    group = "model train step (single attention)"
    write_run(tmp_path, "old", "2026-11-01T00:00:00+00:00",
              [row(group, "published", 1.0, True), row(group, "auto", 0.8)])
    write_run(tmp_path, "new", "2026-11-02T00:00:00+00:00",
              [row(group, "published", 1.0, True), row(group, "auto", 0.98, spread=0.05)])
    write_run(tmp_path, "opsonly", "2026-11-03T00:00:00+00:00",
              [row("boom forward+backward", "torch", 1.0, True), row("boom forward+backward", "reference", 2.0)])
    _, readme, messages = render(tmp_path)
    before, after = README_TEXT.split(render_results.HEADLINE_START)[0], README_TEXT.split(render_results.HEADLINE_END)[1]
    assert readme.startswith(before) and readme.endswith(after)
    headline = readme[readme.index(render_results.HEADLINE_START):readme.index(render_results.HEADLINE_END)]
    assert "hand-written" not in headline
    assert "1.02x (not significant)" in headline and "1.25x" not in headline  # the newest model run only
    assert "boom" not in headline
    assert "2026-11-02_new.md" in headline and "GPU" in headline and "not yet measured" in headline
    assert any("headline" in m for m in messages)


def test_missing_headline_markers_leave_the_readme_alone(tmp_path):
    write_run(tmp_path, "r", "2026-11-01T00:00:00+00:00", [row("model x", "published", 1.0, True)])
    (tmp_path / "README.md").write_text("no markers here\n")
    _, readme, messages = render(tmp_path)
    assert readme == "no markers here\n"
    assert any(m.startswith("headline not written") and "markers" in m for m in messages)


def test_without_matplotlib_plots_are_skipped_plainly_and_existing_plots_stay_linked(tmp_path, monkeypatch):
    write_run(tmp_path, "drawn", "2026-11-01T00:00:00+00:00", [row("g", "torch", 1.0, True)])
    write_run(tmp_path, "undrawn", "2026-11-02T00:00:00+00:00", [row("g", "torch", 1.0, True)])
    (tmp_path / "2026-11-01_drawn.png").write_bytes(b"png from an earlier rendering")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    results, _, messages = render(tmp_path, plots=True)
    assert render_results.PLOTS_SKIPPED in messages
    assert "(results/2026-11-01_drawn.png)" in section(results, "drawn")
    assert ".png" not in section(results, "undrawn")


def test_other_json_files_in_the_results_folder_are_left_alone(tmp_path):
    write_run(tmp_path, "r", "2026-11-01T00:00:00+00:00", [row("g", "torch", 1.0, True)])
    (tmp_path / "compile_sm90.json").write_text(json.dumps(dict(command="x", arch="sm_90a")))
    results, _, _ = render(tmp_path)
    assert "git r," in results and "sm_90a" not in results


def test_runs_measured_before_interleaving_say_so(tmp_path):
    write_run(tmp_path, "legacy", "2026-11-01T00:00:00+00:00", [row("g", "torch", 1.0, True)])
    record = json.loads((tmp_path / "2026-11-01_legacy.json").read_text())
    del record["protocol"]
    (tmp_path / "2026-11-01_legacy.json").write_text(json.dumps(record))
    results, _, _ = render(tmp_path)
    assert render_results.LEGACY_NOTE in results
