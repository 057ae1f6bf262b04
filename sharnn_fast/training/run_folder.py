"""The --save folder of a run: one run at a time, never a run replaced by accident, nothing lost.

Rules (README, "Training"):

- A folder holds a run when it has ``last.pt``, ``best.pt`` or ``metrics.jsonl``. A new run there
  is refused (resume it, or choose another folder) unless ``overwrite`` is asked for, which deletes
  those three files first.
- One run per folder at a time: rank 0 holds :class:`~._io.FolderLock` on it for the run's life.
- A resume into the checkpoint's own folder continues that run. What a continuation from an earlier
  step would replace is moved aside, not deleted: a ``last.pt`` of a later step and the metrics
  events logged after the resumed step go to ``replaced-after-step-S-TIME/`` in the folder (a
  ``best.pt`` of a later step too), and one note says so before the first step.
- A resume into another folder starts a new history there: its ``best.pt`` is the best of its own
  evaluations (the checkpoint's best stays where it was).
- Temporary files that a killed write left (``.last.pt.XXXXXXXX.tmp``, ...) are removed.
- A resume of a complete run (its last step trained, evaluated on valid, and its test event in
  the checkpoint folder's metrics.jsonl) does nothing and says so.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .._files import atomic_open
from ._io import FolderLock, remove_stale_temporaries
from .errors import UserInputError
from .report import METRICS_NAME

RUN_FILES = ("last.pt", "best.pt", METRICS_NAME)


def checkpoint_step(path) -> Optional[int]:
    """The step a checkpoint holds (``progress.step``), read with its tensors memory-mapped rather
    than loaded; None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["progress"]["step"])
    except Exception:  # noqa: BLE001: any unreadable file counts as "step unknown"
        return None


def metrics_events(path) -> list:
    """(step, raw line) of each line of a metrics.jsonl; a line that is not an event (cut short by a
    crash) gets step inf. [] when the file does not exist."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            step = float(step) if isinstance(step, (int, float)) else math.inf
        except (ValueError, KeyError, TypeError):
            step = math.inf
        events.append((step, line))
    return events


def complete_run_message(resume_path, progress: dict, finished: bool) -> Optional[str]:
    """One line saying that the run of the checkpoint at ``resume_path`` is complete, or None: it
    is complete when ``finished`` (its step reached --max-steps or --epochs), its last valid
    evaluation was at that step, and its folder's metrics.jsonl holds a test event at that step."""
    if not finished:
        return None
    step, folder = progress["step"], Path(resume_path).parent
    events = {}
    for line_step, line in metrics_events(folder / METRICS_NAME):
        if line_step == step:
            event = json.loads(line)
            events[event.get("split")] = event
    valid = progress.get("last_valid") or events.get("valid")
    if valid is None or valid["step"] != step or "test" not in events:
        return None
    bpc = ", ".join(f"{split} {events[split]['bpc']:.4f} bpc" for split in ("valid", "test")
                    if split in events and isinstance(events[split].get("bpc"), float))
    return (f"sharnn train: {resume_path} is a complete run (step {step:,}, evaluated{': ' + bpc if bpc else ''}); "
            f"nothing to do, nothing changed. To train on, resume with a larger --max-steps or --epochs")


class RunFolder:
    """Rank 0's hold on a run's --save folder: open() makes it, locks it and tidies it for the run
    (see the module docstring), collecting the notes to print before the first step; close()
    releases the lock."""

    def __init__(self, path, *, resume: Optional[dict], resume_path, overwrite: bool):
        self.path = Path(path)
        self.resume, self.resume_path, self.overwrite = resume, resume_path, overwrite
        self.same_folder = resume_path is not None and Path(resume_path).resolve().parent == self.path.resolve()
        self.notes: list[str] = []
        self.lock: Optional[FolderLock] = None

    def open(self) -> "RunFolder":
        started = time.time()
        if self.path.exists() and not self.path.is_dir():
            raise UserInputError(f"--save {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"--save {self.path}: cannot create the folder ({err.strerror})") from None
        self.lock = FolderLock(self.path, argument="--save", command="sharnn train").acquire()
        try:
            self._tidy(started)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _tidy(self, started: float) -> None:
        removed = remove_stale_temporaries(self.path, RUN_FILES, before=started)
        if removed:
            self.notes.append(f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} that "
                              f"interrupted writes left in {self.path} ({sum(n for _, n in removed) / 1e6:,.1f} MB)")
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if self.same_folder:
            self._set_aside_the_replaced_steps()
        elif existing and not self.overwrite:
            hint = f"continue it with --resume {self.path / 'last.pt'}, " if "last.pt" in existing else ""
            raise UserInputError(f"--save {self.path} already holds a run ({', '.join(existing)}): {hint}"
                                 f"choose a new --save folder, or add --overwrite to replace it")
        elif existing:
            for name in existing:
                (self.path / name).unlink()
            self.notes.append(f"--overwrite: deleted the previous run's {', '.join(existing)} in {self.path}")
        if self.resume is not None and not self.same_folder:
            p = self.resume["progress"]
            if p.get("best_valid_bpc") is not None:
                self.notes.append(f"resuming {self.resume_path} (step {p['step']:,}) into the new folder {self.path}: "
                                  f"best.pt here will be the best of this run's evaluations (the checkpoint's "
                                  f"best, {p['best_valid_bpc']:.4f} bpc at step {p['best_step']:,}, is not this run's)")

    def _set_aside_the_replaced_steps(self) -> None:
        """A resume into the checkpoint's own folder from step S: move a later last.pt and best.pt
        and the metrics events after S to replaced-after-step-S-TIME/ and say so."""
        step = self.resume["progress"]["step"]
        resumed = Path(self.resume_path).resolve()
        later = {}
        for name in ("last.pt", "best.pt"):
            path = self.path / name
            if path.exists() and path.resolve() != resumed:
                saved = checkpoint_step(path)
                if saved is None or saved > step:
                    later[name] = saved
        events = metrics_events(self.path / METRICS_NAME)
        moved = [line for line_step, line in events if line_step > step]
        if not later and not moved:
            return
        aside = self._new_aside_folder(step)
        for name in later:
            os.replace(self.path / name, aside / name)
        if moved:
            with atomic_open(aside / METRICS_NAME, "w") as out:
                out.write("".join(line + "\n" for line in moved))
            with atomic_open(self.path / METRICS_NAME, "w") as out:
                out.write("".join(line + "\n" for line_step, line in events if line_step <= step))
        what = [f"{name} ({'step ' + format(s, ',') if s is not None else 'unreadable'})" for name, s in later.items()]
        if moved:
            what.append(f"the {len(moved)} metrics event{'s' if len(moved) > 1 else ''} after step {step:,}")
        self.notes.append(f"resuming from {Path(self.resume_path).name} (step {step:,}) into {self.path}: "
                          f"{' and '.join(what)} belong to the steps this run replaces: moved to {aside}/")

    def _new_aside_folder(self, step: int) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):
            aside = self.path / f"replaced-after-step-{step}-{stamp}{'-' + str(attempt) if attempt else ''}"
            try:
                aside.mkdir()
                return aside
            except FileExistsError:
                continue
        raise UserInputError(f"--save {self.path}: too many replaced-after-step-{step}-{stamp}* folders")
