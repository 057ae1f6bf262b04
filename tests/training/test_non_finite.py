"""NaN and inf in training, evaluation and the metrics log: a diverging run stops naming a
checkpoint that is good, no checkpoint ever holds a non-finite weight, best is never NaN, reading a
broken checkpoint is an error, metrics.jsonl stays strict JSON, non-finite flags are refused."""
import json
import math
from pathlib import Path

import pytest
import torch

import sharnn_fast
from sharnn_fast.training import TrainingDiverged, UserInputError, read_checkpoint, train
from sharnn_fast.training.loop import NextByteLoss, evaluate_checkpoint
from sharnn_fast.training.report import MetricsLog, read_metrics
from training_helpers import SMALL, SMALL_CONFIG, assert_one_line_error, run_sharnn


def run(corpus_file, save_dir, **overrides):
    return train("tiny", dict(SMALL_CONFIG, data=str(corpus_file), **overrides), save_dir=save_dir)


def strict_events(folder):
    """metrics.jsonl parsed as strict JSON: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds a bare {constant}: not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_checkpoints_are_good(folder):
    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            payload = read_checkpoint(folder / name)  # raises for a non-finite weight
            assert all(torch.isfinite(v).all() for v in payload["model"].values())
            best = payload["progress"]["best_valid_bpc"]
            assert best is None or math.isfinite(best)


# Too large a learning rate, with LAMB and SGD: the weights overflow (finite or not) after some step
# whose loss was still finite. Before the fix the checkpoint of that step was saved, best took NaN.
@pytest.mark.parametrize("optimizer, lr", [("lamb", 1e38), ("sgd", 1e30), ("sgd", 1e38)])
def test_a_diverging_run_never_saves_a_broken_checkpoint(tmp_path, corpus_file, optimizer, lr):
    with pytest.raises(TrainingDiverged, match=r"NaN or inf (at|by) step 1\b.*stopped; no checkpoint was saved"):
        run(corpus_file, tmp_path, max_steps=20, eval_interval=1, optimizer=optimizer, lr=lr, warmup=0, clip=0.0)
    assert_checkpoints_are_good(tmp_path)
    valid = [e for e in strict_events(tmp_path) if e["split"] == "valid"]
    assert all(e["bpc"] is None or math.isfinite(e["bpc"]) for e in valid)


def test_the_named_checkpoint_is_good_and_evaluates(tmp_path, corpus_file):
    """Four good steps, then a learning rate that makes the weights overflow: the stop names
    last.pt at step 4, which loads, evaluates to a finite bpc and resumes."""
    run(corpus_file, tmp_path, max_steps=4, eval_interval=2)
    with pytest.raises(TrainingDiverged, match=r"the last good checkpoint is .*last.pt \(step 4\)"):
        train(None, dict(max_steps=20, lr=1e38, warmup=0, clip=0.0), resume_path=tmp_path / "last.pt")
    assert_checkpoints_are_good(tmp_path)
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 4
    assert math.isfinite(evaluate_checkpoint(tmp_path / "last.pt", batch_size=2)["bpc"])


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward sends inf: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_a_non_finite_gradient_at_a_finite_loss_stops_the_run(tmp_path, corpus_file, monkeypatch):
    calls = []
    forward = NextByteLoss.forward

    def forward_with_a_bad_step_3(self, x, y, hidden=None, mems=None):
        loss, hidden, mems = forward(self, x, y, hidden, mems)
        calls.append(1)
        return (_InfiniteGradient.apply(loss) if len(calls) == 3 else loss), hidden, mems
    monkeypatch.setattr(NextByteLoss, "forward", forward_with_a_bad_step_3)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became NaN or inf at step 3 \(its loss was finite\)"
                                               r".*last good checkpoint is .*last.pt \(step 2\)"):
        run(corpus_file, tmp_path, max_steps=10, eval_interval=1, log_interval=1)
    assert_checkpoints_are_good(tmp_path)
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 2
    train_events = [e for e in strict_events(tmp_path) if e["split"] == "train"]
    assert [e["step"] for e in train_events] == [1, 2, 3] and math.isfinite(train_events[-1]["loss"])


def test_a_checkpoint_with_non_finite_weights_is_refused_everywhere(tmp_path, corpus_file):
    run(corpus_file, tmp_path, max_steps=1)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    payload["model"]["encoder.weight"][0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    del payload["checksum"]  # as sharnn_fast 0.1, which had no checksum, saved a diverged run's weights
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(UserInputError, match=r"holds NaN or inf weights \(3 non-finite values in 1 tensor, "
                                             r"first encoder.weight\)"):
        sharnn_fast.load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(UserInputError, match="holds NaN or inf weights"):
        train(None, {"max_steps": 2}, resume_path=tmp_path / "broken.pt")
    assert_one_line_error(run_sharnn("eval", "--checkpoint", tmp_path / "broken.pt"), "holds NaN or inf weights")
    assert_one_line_error(run_sharnn("generate", "--checkpoint", tmp_path / "broken.pt", "--prompt", "a"),
                          "holds NaN or inf weights")


def test_metrics_jsonl_writes_non_finite_numbers_as_null_and_says_why(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.write(dict(step=1, split="train", loss=math.nan, bpc=math.inf, lr=1e-3, tokens_per_s=5.0))
    log.write(dict(step=2, split="valid", loss=1.0, bpc=1.5, lr=1e-3, tokens_per_s=5.0))
    first, second = strict_events(tmp_path)
    assert first["loss"] is None and first["bpc"] is None and first["lr"] == 1e-3
    assert first["non_finite"] == {"loss": "NaN", "bpc": "Infinity"}
    assert "non_finite" not in second
    assert [e["bpc"] for e in read_metrics(tmp_path)] == [None, 1.5]


def test_non_finite_flags_are_refused(tmp_path, corpus_file):
    for flag, value in (("--lr", "inf"), ("--lr", "nan"), ("--clip", "inf"), ("--wdecay", "inf")):
        assert_one_line_error(run_sharnn("train", *SMALL, "--data", corpus_file, flag, value, "--max-steps", "1",
                                         "--save", tmp_path), f"{flag} must be a finite number >= 0")
    assert_one_line_error(run_sharnn("train", "--data", corpus_file, "--split", "nan,1,1"),
                          "--split must be three positive numbers")


def test_resuming_with_another_optimizer_is_refused(tmp_path, corpus_file):
    run(corpus_file, tmp_path, max_steps=1)
    with pytest.raises(UserInputError, match="trained with --optimizer lamb; its optimizer state cannot continue as "
                                             "--optimizer sgd"):
        train(None, dict(max_steps=2, optimizer="sgd"), resume_path=tmp_path / "last.pt")


def flip_a_weight_bit(source, target):
    """Copy a checkpoint and flip one bit in the middle of its largest tensor's bytes: torch.save
    stores them uncompressed in a zip, after the member's local header (30 bytes, the name, the
    extra field)."""
    import struct
    import zipfile
    with zipfile.ZipFile(source) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(Path(source).read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x10
    Path(target).write_bytes(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_refused_everywhere(tmp_path, corpus_file):
    """One flipped bit in a weight: torch.load does not notice (the zip's CRC is not checked); the
    checksum saved in the checkpoint does, in load_checkpoint, eval, generate and --resume."""
    run(corpus_file, tmp_path, max_steps=1)
    flip_a_weight_bit(tmp_path / "last.pt", tmp_path / "flipped.pt")
    torch.load(tmp_path / "flipped.pt", weights_only=True)  # still loads: only the checksum can tell
    sharnn_fast.load_checkpoint(tmp_path / "last.pt")  # the original is fine
    corrupt = "is corrupt: its content does not match the checksum saved with it"
    with pytest.raises(UserInputError, match=corrupt):
        sharnn_fast.load_checkpoint(tmp_path / "flipped.pt")
    with pytest.raises(UserInputError, match=corrupt):
        train(None, {"max_steps": 2}, resume_path=tmp_path / "flipped.pt")
    assert_one_line_error(run_sharnn("eval", "--checkpoint", tmp_path / "flipped.pt"), corrupt)
    assert_one_line_error(run_sharnn("generate", "--checkpoint", tmp_path / "flipped.pt", "--prompt", "a"), corrupt)


def test_the_checksum_covers_every_value_of_a_checkpoint():
    """content_digest changes with any tensor byte, dtype or shape and any plain value, and not with
    the checksum field itself."""
    from sharnn_fast.training.checkpoint import content_digest
    base = dict(format="f", version=1, model={"w": torch.arange(6, dtype=torch.float32)},
                progress={"step": 3, "best": None, "lr": 0.5}, rng={"cuda": None}, carry=[(torch.zeros(2),)])
    digest = content_digest(base)
    assert content_digest(dict(base, checksum={"sha256": "x"})) == digest
    variants = [
        dict(base, model={"w": torch.arange(6, dtype=torch.float32).index_put_((torch.tensor(5),), torch.tensor(5.5))}),
        dict(base, model={"w": torch.arange(6, dtype=torch.float64)}),
        dict(base, model={"w": torch.arange(6, dtype=torch.float32).view(2, 3)}),
        dict(base, progress={"step": 4, "best": None, "lr": 0.5}),
        dict(base, progress={"step": 3, "best": None, "lr": 0.5000001}),
        dict(base, progress={"step": 3, "best": 0.0, "lr": 0.5}),
        dict(base, carry=[[torch.zeros(2)]]),
    ]
    assert all(content_digest(v) != digest for v in variants)
