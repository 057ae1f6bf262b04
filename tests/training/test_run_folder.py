"""The --save folder (issue 21, items 1, 3, 4 and 10), through the ``sharnn`` command: a run never
replaces another by accident, one run per folder at a time (a lock that a SIGKILL does not leave
stuck), a resume from an earlier checkpoint moves what it replaces aside and says so, temporary
files of killed writes are removed, files get the umask's mode, and metrics.jsonl keeps every
evaluation that is due, no more."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from training_helpers import ROOT, SMALL, assert_one_line_error, run_sharnn, sharnn_env


def events(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def step_of(path):
    return torch.load(path, weights_only=True)["progress"]["step"]


def snapshot(folder, but=()):
    """{relative path: (bytes, mode, mtime_ns)} of every file under folder, less those named in but."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in but}


def start_sharnn(*args, umask=None):
    """`sharnn ARGS` in the background, stdout a pipe read line by line."""
    return subprocess.Popen([sys.executable, "-m", "sharnn_fast", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=sharnn_env(), cwd=ROOT,
                            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def wait_for_step(process, step):
    for line in process.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {process.stderr.read()}")


def stop(process, sig):
    process.send_signal(sig)
    try:
        return process.communicate(timeout=60)
    finally:
        process.kill()


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_unless_overwrite(tmp_path, corpus_file):
    """Before: the second run replaced best.pt and cut metrics.jsonl, exit 0."""
    run = tmp_path / "run"
    common = [*SMALL, "--data", corpus_file, "--save", run]
    assert run_sharnn("train", *common, "--max-steps", "8").returncode == 0
    before = snapshot(run, but=[".sharnn.lock"])  # the lock file names its last holder
    refused = run_sharnn("train", *common, "--max-steps", "4", "--seed", "7")
    assert_one_line_error(refused, f"--save {run} already holds a run (last.pt, best.pt, metrics.jsonl)",
                          f"--resume {run / 'last.pt'}", "new --save folder", "--overwrite")
    assert snapshot(run, but=[".sharnn.lock"]) == before  # the run is untouched

    replaced = run_sharnn("train", *common, "--max-steps", "4", "--seed", "7", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "--overwrite: deleted the previous run's last.pt, best.pt, metrics.jsonl" in replaced.stdout
    assert step_of(run / "best.pt") == step_of(run / "last.pt") == 4
    assert [e["step"] for e in events(run) if e["split"] == "train"] == [1, 2, 3, 4]  # the new run's alone
    help_text = " ".join(run_sharnn("train", "--help").stdout.split())
    assert "--overwrite let a new run replace the run in --save" in help_text


def test_one_run_per_folder_and_a_killed_run_leaves_no_stuck_lock(tmp_path, corpus_file):
    """Before: two runs in one folder both exited 0, their logs interleaved. Now the second is refused
    naming the first's pid; after a SIGKILL of the first, the folder is free at once."""
    first = start_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "100000", "--save", tmp_path)
    try:
        wait_for_step(first, 5)  # past the first checkpoint (step 4)
        second = run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "2", "--save", tmp_path,
                            "--overwrite")
        assert_one_line_error(second, f"--save {tmp_path} is in use by pid {first.pid} on ", "sharnn train",
                              "one run per folder")
        also = run_sharnn("train", "--resume", tmp_path / "last.pt", "--max-steps", "6")
        assert_one_line_error(also, f"is in use by pid {first.pid}")
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    step = step_of(tmp_path / "last.pt")
    resumed = run_sharnn("train", "--resume", tmp_path / "last.pt", "--max-steps", step + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"finished after {step + 1} steps" in resumed.stdout


def test_resume_from_best_moves_what_it_replaces_aside_and_says_so(tmp_path, corpus_file):
    """Before: --resume DIR/best.pt overwrote a later last.pt and cut metrics.jsonl back, with no
    note. Now both go to DIR/replaced-after-step-4-TIME/, said in one note; no line is lost."""
    first = start_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "100000", "--save", tmp_path)
    wait_for_step(first, 6)
    _, stderr = stop(first, signal.SIGTERM)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    last_step = step_of(tmp_path / "last.pt")
    assert step_of(tmp_path / "best.pt") == 4 < last_step
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()

    resumed = run_sharnn("train", "--resume", tmp_path / "best.pt", "--max-steps", "8")
    assert resumed.returncode == 0, resumed.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-after-step-4-")]
    assert len(aside) == 1, list(tmp_path.iterdir())
    aside = aside[0]
    later = [line for line in lines if json.loads(line)["step"] > 4]
    note = [line for line in resumed.stdout.splitlines() if line.startswith("note: resuming from best.pt (step 4)")]
    assert len(note) == 1, resumed.stdout
    assert f"last.pt (step {last_step})" in note[0] and f"the {len(later)} metrics events after step 4" in note[0]
    assert str(aside) in note[0]
    assert step_of(aside / "last.pt") == last_step  # the replaced checkpoint, kept
    assert (aside / "metrics.jsonl").read_text().splitlines() == later
    now = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert now[:len(lines) - len(later)] == [line for line in lines if json.loads(line)["step"] <= 4]
    assert [e["step"] for e in events(tmp_path) if e["split"] == "train"] == list(range(1, 9))
    assert step_of(tmp_path / "last.pt") == 8


def test_a_resume_into_another_folder_has_its_own_best(tmp_path, corpus_file):
    """Stage 2 resumed from stage 1's best.pt into its own folder: its best.pt is the best of its
    own evaluations. Before: it kept stage 1's best, so a worse stage 2 wrote no best.pt at all and
    its summary reported stage 1's best as its own."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "4", "--save", stage1).returncode == 0
    # A learning rate that makes stage 2 worse than stage 1's best (finite, not diverged).
    resumed = run_sharnn("train", "--resume", stage1 / "best.pt", "--max-steps", "8", "--lr", "0.5", "--warmup", "0",
                         "--save", stage2)
    assert resumed.returncode == 0, resumed.stderr
    valid = {e["step"]: e["bpc"] for e in events(stage2) if e["split"] == "valid"}
    stage1_best = read_best(stage1)
    assert min(valid.values()) > stage1_best  # the test's premise: stage 2 is worse
    assert "is not this run's" in resumed.stdout and f"{stage1_best:.4f} bpc at step 4" in resumed.stdout
    best_step = min(valid, key=valid.get)
    assert step_of(stage2 / "best.pt") == best_step > 4
    assert f"best {valid[best_step]:.4f} at step {best_step}" in resumed.stdout


def read_best(folder):
    return torch.load(folder / "best.pt", weights_only=True)["progress"]["best_valid_bpc"]


def test_a_stop_on_an_evaluation_step_is_evaluated_by_the_resume(tmp_path, corpus_file):
    """Every step evaluates (--eval-interval 1), so a SIGTERM's stop lands on an evaluation step: the
    run saves without evaluating (a stop must be quick), and its resume makes that evaluation first.
    Before: the resume went on past it, and that step had no valid event for good."""
    first = start_sharnn("train", *SMALL, "--eval-interval", "1", "--data", corpus_file, "--max-steps", "100000",
                         "--save", tmp_path)
    wait_for_step(first, 3)
    _, stderr = stop(first, signal.SIGTERM)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    stopped = step_of(tmp_path / "last.pt")
    assert stopped not in {e["step"] for e in events(tmp_path) if e["split"] == "valid"}  # not evaluated
    resumed = run_sharnn("train", "--resume", tmp_path / "last.pt", "--max-steps", stopped + 2)
    assert resumed.returncode == 0, resumed.stderr
    valid = [e for e in events(tmp_path) if e["split"] == "valid"]
    assert [e["step"] for e in valid] == list(range(1, stopped + 3))  # each step once, none missing
    due = valid[stopped - 1]
    assert due["lr"] > 0  # the lr of the step that made the weights, not 0
    assert step_of(tmp_path / "best.pt") >= stopped


def test_resume_of_a_complete_run_says_so_and_changes_nothing(tmp_path, corpus_file):
    """Before: it evaluated again and appended valid and test events with lr 0."""
    assert run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "4", "--save", tmp_path).returncode == 0
    before = snapshot(tmp_path)
    for name in ("last.pt", "best.pt"):
        again = run_sharnn("train", "--resume", tmp_path / name)
        assert again.returncode == 0, again.stderr
        assert f"{tmp_path / name} is a complete run (step 4, evaluated: valid " in again.stdout
        assert "nothing to do" in again.stdout and again.stderr == ""
        assert snapshot(tmp_path) == before
    longer = run_sharnn("train", "--resume", tmp_path / "last.pt", "--max-steps", "5")  # more steps: trains on
    assert longer.returncode == 0 and "finished after 5 steps" in longer.stdout, longer.stderr


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(tmp_path, corpus_file):
    """A write killed mid-way leaves .NAME.XXXXXXXX.tmp, the size of a checkpoint. Before: never
    removed, not even by a resume. Now the next run in the folder removes those of its own files
    (and nothing else)."""
    assert run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "4", "--save", tmp_path).returncode == 0
    stale = [tmp_path / ".last.pt.k2j_9xq1.tmp", tmp_path / ".best.pt.abcdefgh.tmp",
             tmp_path / ".metrics.jsonl.0a1b2c3d.tmp"]
    kept = [tmp_path / ".notes.txt.abcdefgh.tmp", tmp_path / ".last.pt.tmp", tmp_path / "last.pt.abcdefgh.tmp"]
    for path in stale + kept:
        path.write_bytes(b"\0" * 500_000)
    resumed = run_sharnn("train", "--resume", tmp_path / "last.pt", "--max-steps", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert f"note: removed 3 temporary files that interrupted writes left in {tmp_path} (1.5 MB)" in resumed.stdout

    from sharnn_fast._files import TEMPORARY_NAME, atomic_open

    with atomic_open(tmp_path / "new.pt") as out:  # the pattern is the name atomic_open really gives
        names = [p.name for p in tmp_path.iterdir() if p.name.startswith(".new.pt.")]
        out.write(b"x")
    assert len(names) == 1 and TEMPORARY_NAME.match(names[0])["name"] == "new.pt"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_umasks_mode_and_a_resume_keeps_a_files_mode(tmp_path, corpus_file, umask):
    """Before: 0600 whatever the umask (checkpoints, prepared data), and a resume reset a file's mode
    to 0600."""
    expected = 0o666 & ~umask

    def sharnn(*args):
        process = start_sharnn(*args, umask=umask)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    sharnn("prepare", corpus_file, tmp_path / "data")
    sharnn("train", *SMALL, "--data", tmp_path / "data", "--max-steps", "4", "--save", tmp_path / "run")
    written = [tmp_path / "data" / name for name in ("train.bin", "valid.bin", "test.bin", "meta.json")]
    written += [tmp_path / "run" / name for name in ("last.pt", "best.pt", "metrics.jsonl")]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(expected) for p in written}

    os.chmod(tmp_path / "run" / "last.pt", 0o640)  # a mode the user chose
    sharnn("train", "--resume", tmp_path / "run" / "last.pt", "--max-steps", "5")
    assert oct((tmp_path / "run" / "last.pt").stat().st_mode & 0o777) == oct(0o640)
    assert step_of(tmp_path / "run" / "last.pt") == 5


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_autotune_cache_and_the_embedded_corpus_get_the_umasks_mode(tmp_path, monkeypatch, umask):
    from sharnn_fast import autotuning
    from sharnn_fast.training import data

    monkeypatch.setenv("SHARNN_FAST_CACHE_DIR", str(tmp_path / "tune"))
    monkeypatch.setenv("SHARNN_FAST_CACHE", str(tmp_path / "corpus"))
    monkeypatch.setattr(autotuning, "_disk", {})
    old = os.umask(umask)
    try:
        autotuning.cache_path().parent.mkdir(parents=True, exist_ok=True)
        autotuning._write_atomically(autotuning.cache_path(), dict(format=autotuning.FORMAT, version=autotuning.VERSION, entries={}))
        corpus = data.default_corpus_file(data.MIN_DEFAULT_CORPUS_BYTES)
    finally:
        os.umask(old)
    assert oct(autotuning.cache_path().stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct(corpus.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_prepare_removes_the_temporary_files_a_killed_prepare_left(tmp_path, corpus_file):
    """The same kind in `sharnn prepare`: a killed prepare leaves .train.bin.XXXXXXXX.tmp (up to 90 MB
    for enwik8). Before: never removed. Now the next prepare into the folder removes them."""
    out = tmp_path / "data"
    out.mkdir()
    stale = out / ".train.bin.a1b2c3d4.tmp"
    stale.write_bytes(b"\0" * 1000)
    other = out / "notes.txt"
    other.write_text("mine")
    prepared = run_sharnn("prepare", corpus_file, out)
    assert prepared.returncode == 0, prepared.stderr
    assert not stale.exists() and other.read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {"train.bin", "valid.bin", "test.bin", "meta.json", "notes.txt",
                                               ".sharnn.lock"}


def test_under_torchrun_a_refused_folder_stops_every_rank_with_one_line(tmp_path, corpus_file):
    """Rank 0 alone holds the lock and reads the folder; every rank acts on its answer, so a refusal
    never leaves the other ranks waiting in a collective."""
    run = tmp_path / "run"
    assert run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "2", "--save", run).returncode == 0
    started = time.monotonic()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sharnn_fast", "train", *map(str, SMALL), "--data", str(corpus_file),
                          "--max-steps", "2", "--save", str(run)],
                         capture_output=True, text=True, timeout=120, env=sharnn_env(), cwd=ROOT)
    assert ddp.returncode != 0 and time.monotonic() - started < 100
    assert ddp.stderr.count(f"sharnn train: error: --save {run} already holds a run") == 2, ddp.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "sharnn_fast", "train", "--resume", str(run / "last.pt"), "--max-steps", "3",
                              "--batch_size", "2"],
                             capture_output=True, text=True, timeout=120, env=sharnn_env(), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("sharnn train: finished after 3 steps") == 1
