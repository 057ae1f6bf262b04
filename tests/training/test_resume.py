"""The training loop in-process: exact resume, gradient accumulation, evaluation against a hand
computation, checkpoints (format, atomic writes, bad files)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import sharnn_fast
from sharnn_fast._files import atomic_open
from sharnn_fast.training import UserInputError, read_checkpoint, train
from sharnn_fast.training.loop import evaluate_checkpoint, make_config
from training_helpers import SMALL_CONFIG


def run(corpus_file, save_dir, **overrides):
    return train("tiny", dict(SMALL_CONFIG, data=str(corpus_file), **overrides), save_dir=save_dir)


def train_losses(folder):
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["split"] == "train"]


def test_resume_is_exact(tmp_path, corpus_file):
    """N steps, stop, resume to 2N == 2N steps straight, bitwise (CPU, fp32), with dropout on so
    the random state must be restored, and state carried across the stop."""
    drop = dict(dropout=0.1, dropouth=0.1, dropouti=0.1, eval_interval=3)
    run(corpus_file, tmp_path / "straight", max_steps=8, **drop)
    run(corpus_file, tmp_path / "split", max_steps=4, **drop)
    summary = train(None, {"max_steps": 8}, resume_path=tmp_path / "split" / "last.pt")
    assert summary["step"] == 8 and summary["exit_code"] == 0
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "split" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["progress"]["position"] == b["progress"]["position"] > 0
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "split")
    assert len(train_losses(tmp_path / "split")) == 8


def test_gradient_accumulation_matches_the_whole_batch(tmp_path, corpus_file):
    run(corpus_file, tmp_path / "whole", max_steps=5)
    run(corpus_file, tmp_path / "accumulated", max_steps=5, accumulate=2)
    a = read_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "accumulated" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_eval_bpc_matches_a_hand_computation(tmp_path, corpus_file):
    run(corpus_file, tmp_path, max_steps=3)
    result = evaluate_checkpoint(tmp_path / "last.pt", split="valid", batch_size=2)
    model, config = sharnn_fast.load_checkpoint(tmp_path / "last.pt")
    assert not model.training and config["emsize"] == 16
    valid = torch.tensor(list(corpus_file.read_bytes()[27_000:28_500]))
    total, count = 0.0, 0
    with torch.no_grad():
        for column in valid.view(2, 750):  # two columns, each one pass with no segments
            logits = model.decoder(model(column[:-1, None])[0])
            total += F.cross_entropy(logits.view(-1, 256).double(), column[1:], reduction="sum").item()
            count += 749
    assert result["tokens"] == count
    assert result["bpc"] == pytest.approx(total / count / math.log(2), rel=1e-5)


def test_checkpoint_format_and_load_checkpoint(tmp_path, corpus_file):
    run(corpus_file, tmp_path, max_steps=2, eval_interval=2)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled code
    assert payload["format"] == "sharnn_fast.checkpoint" and payload["version"] == 1
    assert set(payload) >= {"config", "model", "optimizer", "progress", "rng", "carry", "scaler"}
    assert payload["progress"]["step"] == 2 and payload["rng"]["torch_cpu"].shape[0] == 1
    h, c = payload["carry"]["hidden"][0]
    assert h.shape == (1, 4, 16)  # [1, global batch, emsize]
    model, config = sharnn_fast.load_checkpoint(tmp_path / "best.pt")
    assert all(torch.equal(v, payload["model"][k]) for k, v in model.state_dict().items())


def test_bad_checkpoints_get_one_clear_error(tmp_path, corpus_file):
    run(corpus_file, tmp_path, max_steps=1)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated or corrupt"):
        sharnn_fast.load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(UserInputError, match="not a sharnn_fast checkpoint .it looks like a bare state_dict"):
        sharnn_fast.load_checkpoint(tmp_path / "state_dict.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # a whole-model pickle
    with pytest.raises(UserInputError, match="Python objects other than tensors and plain values, which are never loaded"):
        sharnn_fast.load_checkpoint(tmp_path / "pickled_module.pt")
    with pytest.raises(UserInputError, match="does not exist"):
        sharnn_fast.load_checkpoint(tmp_path / "missing.pt")
    resumed = read_checkpoint(tmp_path / "last.pt")["config"]
    with pytest.raises(UserInputError, match="has emsize=16 but the flags ask for emsize=32"):
        make_config(None, {"emsize": 32, "nhid": 64}, resumed, tmp_path / "last.pt")
    with pytest.raises(UserInputError, match="unknown preset 'huge'"):
        make_config("huge", {})


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as out:
            out.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bf16_autocast_on_cpu_trains_and_checkpoints_float32_weights(tmp_path, corpus_file):
    summary = run(corpus_file, tmp_path, max_steps=3, precision="bf16")
    assert "bf16" in summary["model"] and math.isfinite(summary["valid_bpc"])
    weights = read_checkpoint(tmp_path / "last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in weights.values())  # autocast: the weights stay fp32


def test_resuming_a_checkpoint_from_before_the_lamb_clamp_says_so(tmp_path, corpus_file, capsys):
    run(corpus_file, tmp_path, max_steps=1)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    for group in payload["optimizer"]["param_groups"]:
        del group["max_weight_norm"]  # as sharnn_fast 0.1 wrote it
    del payload["checksum"]
    torch.save(payload, tmp_path / "old.pt")
    summary = train(None, {"max_steps": 2}, resume_path=tmp_path / "old.pt", save_dir=tmp_path / "resumed")
    assert summary["exit_code"] == 0
    assert "did not clamp the weight norm at 10" in capsys.readouterr().out
    groups = read_checkpoint(tmp_path / "resumed" / "last.pt")["optimizer"]["param_groups"]
    assert all(group["max_weight_norm"] == 10.0 for group in groups)


def test_the_papers_second_stage_takes_the_new_lr_and_seed(tmp_path, corpus_file):
    """Stage 2 of the paper's recipe at tiny scale: resume best.pt with a new lr and seed 125. The
    weights and optimizer continue; the lr is the new one from the first step; dropout and the
    sequence lengths draw from seed 125 (the same twice, not the exact continuation's)."""
    from sharnn_fast.training.loop import draw_sequence_length

    drop = dict(dropout=0.1, dropouth=0.1, dropouti=0.1, eval_interval=4)
    run(corpus_file, tmp_path / "stage1", max_steps=4, **drop)
    best = tmp_path / "stage1" / "best.pt"
    for name, seed in (("a", {"seed": 125}), ("b", {"seed": 125}), ("exact", {})):
        train(None, dict(max_steps=7, lr=1e-3, wdecay=0.0, **seed), resume_path=best, save_dir=tmp_path / name)
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in steps] == [5, 6, 7] and {e["lr"] for e in steps} == {1e-3}
    first_length = (steps[0]["tokens"] - read_checkpoint(best)["progress"]["tokens"]) // 4  # global batch 4
    assert first_length == draw_sequence_length(16, torch.Generator().manual_seed(125))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b") != train_losses(tmp_path / "exact")
    saved = read_checkpoint(tmp_path / "a" / "last.pt")
    assert saved["config"]["seed"] == 125 and saved["config"]["lr"] == 1e-3 and saved["progress"]["step"] == 7
    assert {g["weight_decay"] for g in saved["optimizer"]["param_groups"]} == {0.0}  # the flag, not the saved one
