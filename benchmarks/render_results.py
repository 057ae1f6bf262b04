"""Render the benchmark runs in benchmarks/results/*.json: benchmarks/RESULTS.md (one section and
one table per run), a speedup plot per run (benchmarks/results/<run>.png) and the headline table of
README.md (between its headline markers).

    python benchmarks/render_results.py        # the plots need matplotlib: pip install ".[plot]"

Runs are never mixed: a ratio is always against the baseline of the same case in the same run, and
a case whose run has no baseline shows no ratio. Each run keeps its device, date, versions, git
revision and command, so every number can be traced and reproduced. Without matplotlib the plots
are skipped (said so), and plots already drawn stay linked.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness.report import (TABLE_LEGEND, number_text, ordered_rows, ratio_to_baseline,  # noqa: E402
                            run_table, size_text, skipped_text, spread_of)
from sharnn_fast._files import write_atomically  # noqa: E402

RESULTS_DIR = HERE / "results"
OUTPUT = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
HEADLINE_START = "<!-- headline: written by benchmarks/render_results.py from benchmarks/results, do not edit -->"
HEADLINE_END = "<!-- end of headline -->"
GPU_PATTERN = re.compile(r"H100|H200|A100|NVIDIA|GeForce|RTX|Tesla", re.IGNORECASE)
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install \".[plot]\"); existing plots stay linked"
LEGACY_NOTE = ("Measured before variants were interleaved: each variant was timed on its own, one "
               "after another, so load that came and went between variants is part of these ratios.")


def load_runs(results_dir: Path = RESULTS_DIR) -> tuple[list, list]:
    """(benchmark runs, newest first; convergence checks) from ``results_dir``/*.json. Other JSON
    files there (e.g. the compile reports) are left alone."""
    runs, convergence = [], []
    for path in sorted(results_dir.glob("*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        if "results" in run:
            runs.append(run)
        elif "final_loss_bits" in run:
            convergence.append(run)
    runs.sort(key=lambda r: r["date"], reverse=True)
    return runs, convergence


def plot_run(run: dict, path: Path) -> None:
    """Bar chart of every variant's speedup over its case's baseline in ``run``; the whiskers span
    baseline quartiles over variant quartiles; light grey bars are not significant. Raises
    ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["results"]
    groups = [g for g in dict.fromkeys(r["group"] for r in rows)
              if any(r["group"] == g and r.get("baseline") for r in rows)]
    height = 1.2 + sum(0.5 + 0.3 * sum(r["group"] == g for r in rows) for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, height), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        members = [r for r in ordered_rows(rows) if r["group"] == group]
        base = spread_of(members[0])
        ratios = [ratio_to_baseline(r, rows) for r in members]
        spreads = [spread_of(r) for r in members]
        low = [ratio.value - base.q1 / s.q3 for ratio, s in zip(ratios, spreads)]
        high = [base.q3 / s.q1 - ratio.value for ratio, s in zip(ratios, spreads)]
        colours = ["#888" if r.get("baseline") else "#ccc" if not ratio.significant
                   else "#3a7" if ratio.value > 1 else "#d66" for r, ratio in zip(members, ratios)]
        ax.barh([r["variant"] for r in members], [ratio.value for ratio in ratios], color=colours,
                xerr=[low, high], ecolor="#444", capsize=2)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{group}: {size_text(members[0].get('size', {}))}", fontsize=7)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("speedup over the baseline in this run (green faster, red slower, "
                           "light grey: not significant)")
    fig.suptitle(f"{run['device']}, git {run['git_revision']}, {run['date'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_section(run: dict, plot: Path | None) -> list:
    """The RESULTS.md section of one run: where and how it was measured, its plot, its table."""
    lines = [f"## {run['device']}, git {run['git_revision']}, {run['date']}", "",
             f"- command: `{run['command']}`",
             f"- torch {run['torch']}, CUDA {run['cuda']}, Triton {run['triton']}, Python {run['python']}",
             f"- results: [`{run['file']}`](results/{run['file']})"]
    protocol = run.get("protocol") or {}
    if protocol.get("interleaved"):
        lines.append(f"- variants interleaved, {protocol['warmup_rounds']} warm-up rounds, "
                     f"{protocol['min_rounds']}-{protocol['max_rounds']} rounds until the median is "
                     f"stable (95% interval within {100 * protocol['target_rel_ci']:.0f}%) or the "
                     f"case's budget is spent")
    else:
        lines.append(f"- {LEGACY_NOTE}")
    if run.get("peaks"):
        peaks = run["peaks"]
        rates = ", ".join(f"{rate:.3g} TFLOP/s {dtype}" for dtype, rate in peaks["matmul_tflops"].items())
        lines.append(f"- machine peaks: {rates}, copy {peaks['copy_gb_per_s']:.3g} GB/s, dependent step "
                     f"{peaks['step_latency_us']:.3g} us ({run.get('peaks_source', 'source not recorded')})")
    lines.append("")
    if plot is not None:
        lines += [f"![speedups, {run['device']}, git {run['git_revision']}](results/{plot.name})", ""]
    lines += [run_table(run["results"]), ""]
    if run.get("skipped"):
        lines += [skipped_text(run["skipped"]), ""]
    return lines


def headline_runs(runs: list) -> list:
    """Per device, the newest run that measured the model (``runs`` is newest first)."""
    chosen = {}
    for run in runs:
        if run["device"] not in chosen and any(r["group"].startswith("model") for r in run["results"]):
            chosen[run["device"]] = run
    return list(chosen.values())


def median_text(row: dict) -> str:
    return f"{number_text(1e3 * row['median_s'])} ms (IQR {number_text(1e3 * row['iqr_s'])})"


def headline_table(runs: list) -> str:
    """README's headline: for the newest model run of each device, the model cases and the op
    cases with a backward, each variant's median and its ratio to that run's baseline."""
    lines = ["| measured on | case | sizes | baseline: median (IQR) | variants: median (IQR), ratio to the baseline |",
             "|---|---|---|---|---|"]
    chosen = headline_runs(runs)
    for run in chosen:
        rows = run["results"]
        for group in dict.fromkeys(r["group"] for r in rows):
            if not (group.startswith("model") or "backward" in group):
                continue
            members = [r for r in ordered_rows(rows) if r["group"] == group]
            base = members[0] if members[0].get("baseline") else None
            if base is None:
                continue
            others = "; ".join(f"{r['variant']} {median_text(r)}, {ratio_to_baseline(r, rows)}"
                               for r in members[1:])
            lines.append(f"| {run['device']} | {group} | {size_text(base.get('size', {}))} | "
                         f"{base['variant']} {median_text(base)} | {others} |")
    if not any(GPU_PATTERN.search(run["device"]) for run in chosen):
        lines.append("| GPU | everything | | | **not yet measured** |")
    sources = "; ".join(f"[`{run['file'].removesuffix('.json')}.md`](benchmarks/results/"
                        f"{run['file'].removesuffix('.json')}.md) (`{run['command']}`, {run['date'][:10]}"
                        + ("" if (run.get("protocol") or {}).get("interleaved")
                           else ", measured before variants were interleaved") + ")"
                        for run in chosen)
    lines += ["", f"Each row comes from one run: {sources or 'none yet'}. Ratio: the baseline's median "
              f"over the variant's, in the same run; \"not significant\": their interquartile ranges "
              f"overlap. All runs: [benchmarks/RESULTS.md](benchmarks/RESULTS.md)."]
    return "\n".join(lines)


def replace_headline(text: str, headline: str) -> str:
    """``text`` with everything between the headline markers replaced by ``headline``. Raises
    ValueError when the markers are missing or out of order."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"the headline markers are missing: put {HEADLINE_START!r} and "
                         f"{HEADLINE_END!r} on lines of their own where the table goes")
    return text[:start + len(HEADLINE_START)] + "\n" + headline + "\n" + text[end:]


def convergence_lines(convergence: list) -> list:
    lines = ["## Convergence on real text (tools/convergence.py)", ""]
    for run in convergence:
        (first, a), (second, b) = run["final_loss_bits"].items()
        lines.append(f"- {run['device']}, {run['dtype']}, {run['steps']} steps on {run['text']}: final "
                     f"loss {first} {a:.3f} / {second} {b:.3f} bits per byte (unigram entropy "
                     f"{run['unigram_entropy_bits']:.2f}); largest difference between the curves "
                     f"{run['max_abs_loss_difference_nats']:.2g} nats. "
                     f"[plot](results/{Path(run['file']).with_suffix('.png').name}), {run['date']}")
    if not convergence:
        lines.append("Not run yet.")
    return lines


def render(results_dir: Path = RESULTS_DIR, output: Path = OUTPUT, readme: Path = README,
           plots: bool = True) -> list:
    """Write ``output`` (and plots into ``results_dir``, and the headline into ``readme``). Returns
    what was done, one line each, including why plots or the headline were skipped."""
    runs, convergence = load_runs(results_dir)
    messages = []
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/render_results.py` from `benchmarks/results/*.json`; do not",
             "edit by hand. One section per run, newest first. Every ratio compares two variants of one",
             "case measured in the same run, against that run's baseline (the published model's eager",
             "computation, or the torch backend for the ops); rows of different runs are never compared.",
             "", TABLE_LEGEND, ""]
    if not any(GPU_PATTERN.search(run["device"]) for run in runs):
        lines += ["**GPU: not yet measured.** No GPU has been available to this project so far; "
                  "every number below is from a CPU.", ""]
    for run in runs:
        png = results_dir / f"{Path(run['file']).stem}.png"
        if plots:
            try:
                plot_run(run, png)
            except ImportError:
                plots = False
                messages.append(PLOTS_SKIPPED)
        lines += run_section(run, png if png.exists() else None)
    lines += convergence_lines(convergence)
    write_atomically(output, "\n".join(lines) + "\n")
    messages.insert(0, f"wrote {output} ({len(runs)} runs)")
    try:
        text = readme.read_text()
        write_atomically(readme, replace_headline(text, headline_table(runs)))
        messages.append(f"wrote the headline table in {readme}")
    except (OSError, ValueError) as err:
        messages.append(f"headline not written: {err}")
    return messages


if __name__ == "__main__":
    for message in render():
        print(message)
