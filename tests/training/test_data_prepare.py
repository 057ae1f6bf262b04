"""Data preparation, the embedded corpus, splits read from disk and batches."""
import hashlib
import json
import zipfile

import pytest
import torch

from sharnn_fast.training.data import (BatchStream, ENWIK8_BYTES, FileBytes, _OpenFile, default_corpus_file,
                                       load_corpus, parse_split, prepare)
from sharnn_fast.training.errors import UserInputError


def test_prepare_a_file_splits_90_5_5_and_records_sizes_and_sha256(tmp_path, corpus_file):
    data = corpus_file.read_bytes()
    meta = prepare(corpus_file, tmp_path / "out")
    assert [meta["splits"][s]["bytes"] for s in ("train", "valid", "test")] == [27_000, 1_500, 1_500]
    written = b"".join((tmp_path / "out" / f"{s}.bin").read_bytes() for s in ("train", "valid", "test"))
    assert written == data  # in order, nothing lost
    for split, entry in meta["splits"].items():
        assert entry["sha256"] == hashlib.sha256((tmp_path / "out" / entry["file"]).read_bytes()).hexdigest()
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    corpus = load_corpus(tmp_path / "out")
    assert corpus.splits["valid"].read() == data[27_000:28_500]


def test_prepare_a_folder_and_a_zip_with_a_custom_split(tmp_path):
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"A" * 600)
    (folder / "b" / "c.txt").write_bytes(b"C" * 400)
    (folder / ".hidden").write_bytes(b"H" * 100)  # left out
    meta = prepare(folder, tmp_path / "f", parse_split("80/10/10"))
    assert [meta["splits"][s]["bytes"] for s in ("train", "valid", "test")] == [800, 100, 100]
    assert (tmp_path / "f" / "train.bin").read_bytes() == b"A" * 600 + b"C" * 200
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as archive:
        archive.writestr("one.txt", b"x" * 1000)
    meta = prepare(tmp_path / "t.zip", tmp_path / "z")
    assert meta["splits"]["train"]["bytes"] == 900


def test_enwik8_is_recognised_by_size_and_gets_the_papers_split(tmp_path):
    enwik8 = tmp_path / "corpus.xml"
    with open(enwik8, "wb") as f:
        f.truncate(ENWIK8_BYTES)  # sparse: no 100 MB written
    splits = load_corpus(enwik8).splits
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [90_000_000, 5_000_000, 5_000_000]
    named = tmp_path / "enwik8"
    named.write_bytes(b"x" * 1000)
    with pytest.raises(UserInputError, match="named like enwik8 but holds 1,000 bytes"):
        load_corpus(named)


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(UserInputError, match="is empty"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "tiny").write_bytes(b"abc")
    with pytest.raises(UserInputError, match="too small to split"):
        load_corpus(tmp_path / "tiny")
    (tmp_path / "unprepared").mkdir()
    with pytest.raises(UserInputError, match="without meta.json"):
        load_corpus(tmp_path / "unprepared")
    with pytest.raises(UserInputError, match="--split"):
        parse_split("0.9,0.1")


def test_prepared_folder_with_a_changed_file_is_refused(tmp_path, corpus_file):
    prepare(corpus_file, tmp_path / "out")
    (tmp_path / "out" / "valid.bin").write_bytes(b"short")
    with pytest.raises(UserInputError, match="should hold 1,500 bytes"):
        load_corpus(tmp_path / "out")


@pytest.mark.parametrize("where", ["file", "memory"])
def test_batches_read_their_columns_and_ranks_take_theirs(tmp_path, where):
    data = torch.arange(103, dtype=torch.int64).to(torch.uint8)  # 103 bytes -> 4 columns of 25
    (tmp_path / "d.bin").write_bytes(bytes(data.tolist()))
    split = load_corpus(tmp_path / "d.bin", (0.98, 0.01, 0.01)).splits["train"]  # 100 bytes
    assert isinstance(split, FileBytes) and split.read() == bytes(range(100))
    if where == "memory":
        split = data[:100]
    whole = BatchStream(split, 4)
    x, y = whole.segment(3, 5, "cpu")
    assert x.shape == (5, 4) and x.dtype == torch.long
    assert x[:, 2].tolist() == list(range(53, 58)) and y[:, 2].tolist() == list(range(54, 59))
    assert x[:, 0].tolist() == list(range(3, 8)) and x[:, 3].tolist() == list(range(78, 83))
    assert whole.segment(20, 10, "cpu")[0].shape == (4, 4)  # cut at the column's end
    rank1 = BatchStream(split, 2, rank=1, world_size=2)
    assert torch.equal(rank1.segment(3, 5, "cpu")[0], x[:, 2:])


def test_a_file_truncated_between_the_check_and_the_read_raises(tmp_path, monkeypatch):
    """The stat check before a read cannot close the race on its own: a read that comes back short
    must raise too (a memory mapping here was SIGBUS, exit 135, no message)."""
    (tmp_path / "d.bin").write_bytes(bytes(range(100)) * 10)
    stream = BatchStream(load_corpus(tmp_path / "d.bin").splits["train"], 4)
    assert stream.segment(200, 10, "cpu")[0].shape == (10, 4)
    monkeypatch.setattr(_OpenFile, "check", lambda self: None)  # as if truncated just after the check
    with open(tmp_path / "d.bin", "r+b") as handle:
        handle.truncate(300)
    with pytest.raises(UserInputError, match=r"the data file .*d.bin changed during the run \(now holds 300 "
                                             r"bytes, not 1,000\)"):
        stream.segment(200, 10, "cpu")


def test_an_unreadable_data_file_gets_one_line(tmp_path, monkeypatch):
    (tmp_path / "d.bin").write_bytes(bytes(1000))

    def refuse(path, flags):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("sharnn_fast.training.data.os.open", refuse)
    with pytest.raises(UserInputError, match=r"cannot read the data file .*d.bin \(Permission denied\)"):
        load_corpus(tmp_path / "d.bin")


def test_too_short_for_the_batch_and_bptt(tmp_path):
    with pytest.raises(UserInputError, match="too short for 8 columns"):
        BatchStream(torch.zeros(100, dtype=torch.uint8), 4, world_size=2, min_length=17)


def test_the_embedded_corpus_is_built_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARNN_FAST_CACHE", str(tmp_path))
    path = default_corpus_file()
    text = path.read_bytes()
    assert path.parent == tmp_path and len(text) >= 200_000
    assert text.decode("utf-8").count(" the ") > 1000  # English prose
    assert default_corpus_file() == path and path.read_bytes() == text


def test_prepare_a_folder_reads_each_file_once_whatever_links_to_it(tmp_path):
    """Issue 21, item 11: a symbolic link to a file in the folder was read again (its bytes twice in
    the splits). Now each file is read once, what was skipped is said, and meta.json lists both."""
    import os

    from training_helpers import run_sharnn

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"A" * 600)
    (folder / "sub" / "c.txt").write_bytes(b"C" * 400)
    os.symlink("../a.txt", folder / "sub" / "link-to-a.txt")  # the same file again
    os.symlink("sub", folder / "z-link-to-sub")  # the same folder again
    os.symlink("..", folder / "sub" / "loop")  # a loop
    os.symlink("missing.txt", folder / "broken.txt")
    result = run_sharnn("prepare", folder, tmp_path / "out", "--split", "80/10/10")
    assert result.returncode == 0, result.stderr
    written = b"".join((tmp_path / "out" / f"{s}.bin").read_bytes() for s in ("train", "valid", "test"))
    assert written == b"A" * 600 + b"C" * 400
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["files"] == [dict(path="a.txt", bytes=600), dict(path="sub/c.txt", bytes=400)]
    assert meta["skipped"] == [
        dict(path="broken.txt", reason="a broken link (to missing.txt)"),
        dict(path="sub/link-to-a.txt", reason="the same file as a.txt, read once"),
        dict(path="sub/loop", reason="the same folder as the source, read once"),
        dict(path="z-link-to-sub", reason="the same folder as sub, read once")]
    assert "read 2 files, 1,000 bytes" in result.stdout
    assert "skipped sub/link-to-a.txt: the same file as a.txt, read once" in result.stdout
    assert load_corpus(tmp_path / "out").digests["train"]["bytes"] == 800
