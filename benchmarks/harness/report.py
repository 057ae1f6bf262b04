"""The limit of a case and the one compact table of a run. Pure Python (no torch), so that
benchmarks/render_results.py and the tests use exactly what the benchmark run prints.

A result row (a dict, as stored in benchmarks/results/*.json) has: ``group`` (the case), ``variant``,
``baseline`` (bool), ``size`` (every size of the case and its dtype), ``median_s``, ``q1_s``, ``q3_s``,
``iqr_s``, ``rounds``, optionally ``tokens_per_s``, ``tflops``, ``limit_s``, ``steps``,
``peak_memory_gib`` and ``info`` (notes such as the SDPA kernel that ran). Rows written before
the interleaved protocol have no quartiles: their spread is taken as median -+ IQR / 2.
"""
from __future__ import annotations

from .timing import Ratio, Spread, compare

# Size keys in the order they are printed; any other key follows, and the dtype comes last.
SIZE_ORDER = ["ntoken", "ninp", "nhid", "nlayers", "T", "Tq", "Tk", "B", "I", "H", "d", "F", "memory"]
SIZE_LABELS = {"ninp": "emsize", "nlayers": "layers"}
UNDERESTIMATED = "limit underestimated"
NUMERIC_COLUMNS = {"median ms", "IQR ms", "rounds", "vs baseline", "tokens/s", "TFLOP/s", "limit ms",
                   "% of limit", "peak GiB"}


def limit_seconds(peaks: dict, dtype: str | None, flops=None, bytes=None, steps=None) -> float | None:
    """The least time the work could take on this machine: the largest of flops at the dense matrix
    rate of ``dtype`` (the fastest measured rate if that dtype was not measured), ``bytes`` at the
    copy bandwidth, and ``steps`` sequential steps at the shortest dependent step. None without work."""
    rates = peaks["matmul_tflops"]
    if not isinstance(rates, dict):  # results written before rates were measured per dtype
        rates = {peaks.get("matmul_dtype", "float32"): rates}
    bounds = []
    if flops:
        bounds.append(flops / (rates.get(dtype, max(rates.values())) * 1e12))
    if bytes:
        bounds.append(bytes / (peaks["copy_gb_per_s"] * 1e9))
    if steps:
        bounds.append(steps * peaks["step_latency_us"] * 1e-6)
    return max(bounds) if bounds else None


def limit_text(limit_s: float | None, median_s: float) -> str:
    """The share of the limit a case reaches, e.g. "62%"; a case measured faster than its limit
    says "limit underestimated" (the limit is a bound, so the bound was wrong), never above 100%."""
    if limit_s is None:
        return ""
    if limit_s > median_s:
        return UNDERESTIMATED
    return f"{100 * limit_s / median_s:.0f}%"


def spread_of(row: dict) -> Spread:
    if "q1_s" in row:
        return Spread(row["median_s"], row["q1_s"], row["q3_s"], row["rounds"])
    half = row["iqr_s"] / 2
    return Spread(row["median_s"], row["median_s"] - half, row["median_s"] + half, row["rounds"])


def ratio_to_baseline(row: dict, rows: list) -> Ratio | None:
    """The row's speedup over the baseline of its group among ``rows`` (one run); None when that
    run has no baseline for the group. Rows of other runs must never be passed in."""
    base = next((r for r in rows if r["group"] == row["group"] and r.get("baseline")), None)
    if base is None:
        return None
    return compare(spread_of(base), spread_of(row))


def number_text(value: float) -> str:
    """Three significant digits without an exponent: 1234 -> "1,234", 58.04 -> "58.0", 0.0372."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def skipped_text(skipped: list) -> str:
    """The variants a run could not time, one line per variant and reason, naming the cases."""
    cases = {}
    for entry in skipped:
        cases.setdefault((entry["variant"], entry["reason"]), []).append(entry["group"])
    return "\n".join(f"- not run: {variant} in {', '.join(groups)}: {reason}"
                     for (variant, reason), groups in cases.items())


def size_text(size: dict) -> str:
    """"T 64, B 4, d 256, F 1024, float32": every size of a case, the dtype last."""
    keys = [k for k in SIZE_ORDER if k in size] + [k for k in size if k not in SIZE_ORDER and k != "dtype"]
    parts = [f"{SIZE_LABELS.get(k, k)} {size[k]}" for k in keys]
    if "dtype" in size:
        parts.append(str(size["dtype"]))
    return ", ".join(parts)


def notes_text(row: dict) -> str:
    notes = [f"{k} {v}" for k, v in row.get("info", {}).items()]
    for key in ("sdpa_backend", "dropout_p", "per_step_us", "saved_activation_mib"):  # rows from before "info"
        if key in row:
            notes.append(f"{key} {row[key]:.3g}" if isinstance(row[key], float) else f"{key} {row[key]}")
    if row.get("steps"):
        notes.append(f"{1e6 * row['median_s'] / row['steps']:.1f} us per sequential step")
    if row.get("baseline") and row.get("stopped") == "budget":
        notes.append("case stopped at its time budget before every median was stable")
    return "; ".join(notes)


def ordered_rows(rows: list) -> list:
    """Rows grouped by case in order of first appearance, the baseline first within its case."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    return [r for g in groups for r in sorted((r for r in rows if r["group"] == g),
                                              key=lambda r: not r.get("baseline"))]


def run_table(rows: list) -> str:
    """The markdown table of one run's rows. Ratios are against the baseline of the same case in
    the same rows; "limit" is the case's limit at this machine's peaks (see limit_seconds)."""
    with_memory = any("peak_memory_gib" in r for r in rows)
    header = ["case", "sizes", "variant", "median ms", "IQR ms", "rounds", "vs baseline", "tokens/s",
              "TFLOP/s", "limit ms", "% of limit"] + (["peak GiB"] if with_memory else []) + ["notes"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in NUMERIC_COLUMNS else "---" for h in header) + "|"]
    for row in ordered_rows(rows):
        ratio = ratio_to_baseline(row, rows)
        cells = [row["group"], size_text(row.get("size", {})), row["variant"],
                 number_text(1e3 * row["median_s"]), number_text(1e3 * row["iqr_s"]), str(row["rounds"]),
                 "baseline" if row.get("baseline") else (str(ratio) if ratio else "no baseline in this run"),
                 f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "",
                 number_text(row["tflops"]) if "tflops" in row else "",
                 number_text(1e3 * row["limit_s"]) if row.get("limit_s") is not None else "",
                 limit_text(row.get("limit_s"), row["median_s"])]
        if with_memory:
            cells.append(f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "")
        cells.append(notes_text(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

TABLE_LEGEND = ("Ratios are the baseline's median over the variant's, both measured in this run; "
                "\"not significant\" means the two interquartile ranges overlap, so the difference is "
                "within the noise. \"limit\" is the least time the case's work could take at this "
                "machine's peak rates; a case measured faster than that says \"limit underestimated\".")
