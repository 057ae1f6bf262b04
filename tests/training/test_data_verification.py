"""Data is checked: a prepared split against its meta.json, the data of a resume against what the
checkpoint was trained on (size and sha256), and a data file that changes during a run."""
import shutil
import subprocess
import sys

import pytest
import torch

from sharnn_fast.training import UserInputError, read_checkpoint, train
from sharnn_fast.training.data import load_corpus
from training_helpers import ROOT, SMALL, SMALL_CONFIG, assert_one_line_error, run_sharnn, sharnn_env


def flip_a_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_prepared_split_is_refused(tmp_path, corpus_file):
    assert run_sharnn("prepare", corpus_file, tmp_path / "data").returncode == 0
    load_corpus(tmp_path / "data")  # intact: loads
    flip_a_byte(tmp_path / "data" / "train.bin")
    with pytest.raises(UserInputError, match=r"train.bin does not match the sha256 in .*meta.json"):
        load_corpus(tmp_path / "data")
    assert_one_line_error(run_sharnn("train", *SMALL, "--data", tmp_path / "data", "--max-steps", "1",
                                     "--save", tmp_path / "run"), "train.bin does not match the sha256")


def test_resume_refuses_changed_or_shortened_data(tmp_path, corpus_file):
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus_file, data)
    train("tiny", dict(SMALL_CONFIG, data=str(data), max_steps=2), save_dir=tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    digests = read_checkpoint(last)["data"]
    assert digests["train"]["bytes"] == 27_000 and len(digests["test"]["sha256"]) == 64
    flip_a_byte(data)
    with pytest.raises(UserInputError, match=r"the train split is not the data checkpoint .*last.pt was trained "
                                             r"on \(the same size, 27,000 bytes, but other content"):
        train(None, {"max_steps": 3}, resume_path=last)
    data.write_bytes(corpus_file.read_bytes()[:15_000])  # halved
    with pytest.raises(UserInputError, match=r"the train split .* \(27,000 bytes then, 13,500 now\)"):
        train(None, {"max_steps": 3}, resume_path=last)
    shutil.copy(corpus_file, data)  # the same bytes again: resumes
    assert train(None, {"max_steps": 3}, resume_path=last)["exit_code"] == 0


def test_a_data_file_truncated_during_a_run_stops_it_with_a_message(tmp_path, corpus_file):
    """Before: SIGBUS (exit 135) with no message. Now: one line naming the file, exit 2, and the
    last checkpoint stays good."""
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus_file, data)
    process = subprocess.Popen([sys.executable, "-m", "sharnn_fast", "train", *map(str, SMALL), "--data", str(data),
                                "--max-steps", "100000", "--eval-interval", "2", "--save", str(tmp_path / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sharnn_env(), cwd=ROOT)
    try:
        for line in process.stdout:
            if line.startswith("step 5/"):
                break
        with open(data, "r+b") as handle:
            handle.truncate(1_000)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, (process.returncode, stderr)
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert f"the data file {data} changed during the run (now holds 1,000 bytes, not 30,000)" in stderr
    good = read_checkpoint(tmp_path / "run" / "last.pt")
    assert good["progress"]["step"] >= 4 and all(torch.isfinite(v).all() for v in good["model"].values())


@pytest.mark.parametrize("field, value", [("bytes", "many"), ("bytes", -1), ("file", "../escape.bin"),
                                          ("sha256", 12)])
def test_a_meta_json_with_a_bad_field_gets_one_line(tmp_path, corpus_file, field, value):
    """Issue 21, item 7: "bytes": "many" was an internal error (a format code applied to a string)."""
    import json

    assert run_sharnn("prepare", corpus_file, tmp_path / "data").returncode == 0
    meta_path = tmp_path / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["splits"]["valid"][field] = value
    meta_path.write_text(json.dumps(meta))
    assert_one_line_error(run_sharnn("train", *SMALL, "--data", tmp_path / "data", "--max-steps", "1",
                                     "--save", tmp_path / "run"), f"splits.valid.{field} must be")
