"""torchrun DDP on CPU (gloo): 2 ranks x batch 4 train like 1 process x batch 8 (the ranks also
accumulate gradients over 2 micro-batches, so DDP's no_sync path runs too)."""
import json
import subprocess
import sys

import torch

from sharnn_fast.training import read_checkpoint
from training_helpers import ROOT, SMALL, run_sharnn, sharnn_env


def test_two_ranks_of_batch_4_match_one_process_of_batch_8(tmp_path, corpus_file):
    common = [*SMALL, "--data", corpus_file, "--max-steps", "4", "--eval-interval", "2", "--seed", "3"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sharnn_fast", "train", *map(str, common), "--batch_size", "4", "--accumulate", "2",
                          "--save", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=180, env=sharnn_env(), cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stdout and ddp.stdout.count("sharnn train: finished") == 1  # rank 0 reports
    single = run_sharnn("train", *common, "--batch_size", "8", "--eval-batch-size", "4", "--save", tmp_path / "single",
                        timeout=180)
    assert single.returncode == 0, single.stderr

    a = read_checkpoint(tmp_path / "ddp" / "last.pt")
    b = read_checkpoint(tmp_path / "single" / "last.pt")
    assert a["progress"]["global_batch"] == b["progress"]["global_batch"] == 8
    assert a["progress"]["world_size"] == 2
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for (ha, ca), (hb, cb) in zip(a["carry"]["hidden"], b["carry"]["hidden"]):  # all 8 columns gathered
        torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)

    def events(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for ea, eb in zip(events(tmp_path / "ddp"), events(tmp_path / "single"), strict=True):
        assert (ea["step"], ea["split"]) == (eb["step"], eb["split"])
        assert abs(ea["loss"] - eb["loss"]) < 1e-5  # valid and test reduced across ranks
        if ea["split"] != "train":
            assert ea["tokens"] == eb["tokens"]


def _torchrun(*args, nproc=2, timeout=180):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "sharnn_fast", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=sharnn_env(), cwd=ROOT)


def test_eval_under_torchrun_scores_the_same_bytes_as_one_process(tmp_path, corpus_file):
    """--batch-size counts the columns of all processes: 2 processes x 3 columns in all (2 + 1, an
    uneven share) give what 1 process gives, printed once; fewer columns than processes is refused."""
    trained = run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "1", "--save", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    ckpt = tmp_path / "run" / "last.pt"
    single = run_sharnn("eval", "--checkpoint", ckpt, "--batch-size", "3", "--json")
    assert single.returncode == 0, single.stderr
    ddp = _torchrun("eval", "--checkpoint", ckpt, "--batch-size", "3", "--json")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    lines = [line for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, ddp.stdout  # one result, not one per process
    one, two = json.loads(single.stdout), json.loads(lines[0])
    assert (one["tokens"], one["processes"], two["processes"]) == (two["tokens"], 1, 2)
    assert abs(one["bpc"] - two["bpc"]) < 1e-6, (one["bpc"], two["bpc"])

    refused = _torchrun("eval", "--checkpoint", ckpt, "--batch-size", "1")
    assert refused.returncode != 0
    # Each process says it in one line before torchrun's own report (which has torchrun's traceback).
    assert refused.stderr.startswith("sharnn eval: error: --batch-size 1 counts the columns of all processes")


def test_dynamic_eval_under_torchrun_sums_the_gradients_as_one_process(tmp_path, corpus_file):
    """--dynamic with 2 processes (2 + 1 columns): the gradients are summed over the processes, so
    the weights adapt as in one process and the dynamic bpc is the same to float rounding."""
    trained = run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "20", "--save", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    ckpt = tmp_path / "run" / "last.pt"
    args = ("eval", "--checkpoint", ckpt, "--batch-size", "3", "--dynamic", "--dynamic-stats-segments", "10", "--json")
    single = run_sharnn(*args)
    assert single.returncode == 0, single.stderr
    ddp = _torchrun(*args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    lines = [line for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, ddp.stdout
    one, two = json.loads(single.stdout)["dynamic"], json.loads(lines[0])["dynamic"]
    assert (one["tokens"], one["updates"]) == (two["tokens"], two["updates"])
    assert abs(one["bpc"] - two["bpc"]) < 1e-5, (one["bpc"], two["bpc"])
