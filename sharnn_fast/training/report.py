"""What a run shows and keeps: the progress display, metrics.jsonl, the final summary, the plot."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from .._files import WriteError, write_failure
from .errors import UserInputError

METRICS_NAME = "metrics.jsonl"
# sharnn_fast is installed from a checkout, not from an index: "sharnn-fast[plot]" would name a
# package that no index holds.
PLOT_INSTALL_HINT = "pip install matplotlib (or, in a checkout of sharnn_fast, pip install '.[plot]')"
LN2 = math.log(2)


def bits_per_byte(loss_nats: float) -> float:
    """Mean cross-entropy in nats per byte -> bits per byte (bpc): divide by ln 2."""
    return loss_nats / LN2


class Progress:
    """A tqdm bar on stderr when stderr is a terminal (step, tokens/s, loss, bpc, lr), else one
    plain line per log interval on stdout. Silent on ranks other than 0."""

    def __init__(self, *, total: Optional[int], initial: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        self.total = total
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        if event["split"] != "train":
            self.message(f"step {event['step']} | {event['split']} | bpc {event['bpc']:.4f} | loss "
                         f"{event['loss']:.4f} | {event['tokens']:,} bytes at {event['tokens_per_s']:,.0f} tok/s")
        elif self.bar is not None:
            self.bar.set_postfix_str(f"tok/s {event['tokens_per_s']:,.0f} loss {event['loss']:.3f} "
                                     f"bpc {event['bpc']:.3f} lr {event['lr']:.2e}", refresh=False)
        else:
            total = f"/{self.total}" if self.total else ""
            print(f"step {event['step']}{total} | epoch {event['epoch'] + 1} | lr {event['lr']:.2e} | "
                  f"loss {event['loss']:.4f} | bpc {event['bpc']:.4f} | {event['tokens_per_s']:,.0f} tok/s | "
                  f"{event['time_s']:.1f} s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(description: Optional[str], *, total: int, enabled: bool):
    """A tqdm bar counting bytes (so its rate is tokens/s) on stderr, when ``enabled`` and stderr
    is a terminal, as the training bar; else an object whose update and close do nothing."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, dynamic_ncols=True, leave=False,
                file=sys.stderr)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, one line per log or evaluation event, each with at
    least step, split ("train", "valid" or "test"), loss (nats per byte), bpc, lr and tokens_per_s.
    Strict JSON (RFC 8259): a NaN or infinite number is written as null, and the event's
    ``non_finite`` field maps each such field to what it was ("NaN", "Infinity" or "-Infinity").
    Events are appended; what a resume replaces is moved aside first (:mod:`.run_folder`)."""

    def __init__(self, folder: Path, enabled: bool):
        self.path = Path(folder) / METRICS_NAME
        self.enabled = enabled

    def write(self, event: dict) -> None:
        """Append one event. Raises WriteError when the storage fails (a full disk, say)."""
        if self.enabled:
            try:
                with open(self.path, "a") as out:
                    out.write(strict_json(event) + "\n")
            except OSError as err:
                raise WriteError(f"{write_failure(err, self.path)}: could not write {self.path}") from err


def strict_json(event: dict) -> str:
    """``event`` as strict JSON: NaN and infinite numbers become null, and a ``non_finite`` field
    says what each was ({"loss": "NaN", "bpc": "NaN"}); Python's json would write a bare NaN."""
    non_finite = {k: json.dumps(v) for k, v in event.items() if isinstance(v, float) and not math.isfinite(v)}
    if non_finite:
        event = {k: (None if k in non_finite else v) for k, v in event.items()}
        event["non_finite"] = non_finite
    return json.dumps(event, allow_nan=False)


def read_metrics(folder) -> list[dict]:
    """The events of ``folder/metrics.jsonl`` (or of that file itself). Raises UserInputError
    when it is missing or holds no valid line."""
    path = Path(folder)
    path = path / METRICS_NAME if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(f"{path} does not exist: give the --save folder of a `sharnn train` run")
    try:
        text = path.read_text(errors="replace")  # a file that is not text holds no valid line
    except OSError as err:
        raise UserInputError(f"cannot read {path} ({err.strerror or err})") from None
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if (isinstance(event, dict) and {"step", "split", "bpc"} <= event.keys()
                and isinstance(event["step"], (int, float)) and isinstance(event["bpc"], (int, float, type(None)))):
            events.append(event)
    if not events:
        raise UserInputError(f"{path} holds no metrics events")
    return events


def plot_metrics(folder, out=None) -> Path:
    """Draw bits per byte against step for the train, valid and test events of a run's
    metrics.jsonl; returns the image path (default ``folder/curves.png``). Needs matplotlib (the
    ``plot`` extra); raises UserInputError without it."""
    events = read_metrics(folder)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserInputError(f"sharnn plot needs matplotlib, which this Python ({sys.executable}) lacks: "
                             f"{PLOT_INSTALL_HINT}") from None
    folder = Path(folder)
    out = Path(out) if out else (folder if folder.is_dir() else folder.parent) / "curves.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = dict(train=dict(lw=1, alpha=0.8), valid=dict(marker="o", lw=1.5), test=dict(marker="*", ms=12, ls=""))
    for split, style in styles.items():
        points = [(e["step"], e["bpc"]) for e in events if e["split"] == split and e["bpc"] is not None]
        if points:
            ax.plot(*zip(*points), label=split, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(str(folder), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as err:  # a missing folder, an image format matplotlib lacks
        raise UserInputError(f"--out {out}: cannot write the plot ({' '.join(str(err).split())})") from None
    finally:
        plt.close(fig)
    return out


def summary_text(summary: dict) -> str:
    """The end-of-run screen: data, model, final valid and test bpc, time, where things are."""
    s = summary
    lines = [f"sharnn train: {s['stopped']} after {s['step']:,} steps ({s['epochs_done']:.2f} epochs, "
             f"{s['tokens']:,} tokens) in {s['elapsed_s']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s)",
             f"  data        {s['data']}",
             f"  model       {s['model']}"]
    if s.get("valid_bpc") is not None:
        best = (f"best {s['best_valid_bpc']:.4f} at step {s['best_step']:,}" if s.get("best_valid_bpc") is not None
                else "no finite valid bpc yet")
        lines.append(f"  valid       {s['valid_bpc']:.4f} bpc (final model); {best}")
    if s.get("test_bpc") is not None:
        lines.append(f"  test        {s['test_bpc']:.4f} bpc (final model)")
    if s.get("checkpoints"):
        lines.append(f"  checkpoints {', '.join(s['checkpoints'])}")
        lines.append(f"  metrics     {s['metrics']}  (draw them: sharnn plot {s['save']})")
    if s.get("resume_hint"):
        lines.append(f"  resume      {s['resume_hint']}")
    return "\n".join(lines)
