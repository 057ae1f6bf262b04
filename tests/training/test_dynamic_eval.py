"""Dynamic evaluation (sharnn_fast.training.dynamic, ``sharnn eval --dynamic``): text is scored
before it is learnt from, eta = 0 is static evaluation bit for bit, the gain on unseen real text,
the command line (output, bad input), the checkpoint left as it was."""
import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

import sharnn_fast
from sharnn_fast.training import DynamicEval, UserInputError, evaluate_dynamic, train
from sharnn_fast.training.data import BatchStream
from sharnn_fast.training.evaluation import evaluate, score_segments
from test_cli import run_main
from training_helpers import SMALL_CONFIG, assert_one_line_error, run_sharnn

LN2 = math.log(2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    """A small model trained 300 steps (3 s) on the test corpus, with dropout on in its config (so that
    dynamic evaluation must turn it off): (checkpoint path, model, corpus bytes). The model runs the
    reference backend, whose forward is the same computation with and without a graph, so that
    bitwise comparisons with static evaluation hold (see the eta = 0 test)."""
    folder = tmp_path_factory.mktemp("dynamic")
    torch.manual_seed(0)
    train("tiny", dict(SMALL_CONFIG, data=str(corpus_file), max_steps=300, eval_interval=300, dropout=0.1,
                       dropouth=0.1, dropouti=0.1), save_dir=folder, progress=False)
    model, _ = sharnn_fast.load_checkpoint(folder / "last.pt", backend="reference")
    return folder / "last.pt", model, corpus_file.read_bytes()


def stream_of(data: bytes, columns: int = 1) -> BatchStream:
    return BatchStream(torch.tensor(list(data), dtype=torch.uint8), columns)


def train_stream(corpus: bytes, columns: int = 1) -> BatchStream:
    return stream_of(corpus[:27_000], columns)


def bits(losses: torch.Tensor) -> float:
    return losses.double().mean().item() / LN2


@pytest.mark.parametrize("method", ["rms", "sgd"])
def test_eta_zero_is_static_evaluation_bit_for_bit(trained, method):
    """lr 0: the backward and the update run, and change nothing: every byte's loss equals static
    evaluation's exactly (CPU, fp32, the reference backend), dropout off although the checkpoint
    trained with it. With the torch backend, PyTorch's own LSTM forward rounds differently when it
    keeps what a backward needs (torch.lstm's train flag: 9e-8 apart here), so there it is close."""
    path, reference_model, corpus = trained
    torch_model, _ = sharnn_fast.load_checkpoint(path, backend="torch")
    valid = stream_of(corpus[27_000:28_500], columns=2)
    for model, exact in ((reference_model, True), (torch_model, False)):
        static = score_segments(model, valid, bptt=16, keep_losses=True)
        dynamic = evaluate_dynamic(model, valid, DynamicEval(method=method, lr=0.0, bptt=16), bptt=16,
                                   stats_stream=train_stream(corpus, 2), keep_losses=True)
        assert dynamic["updates"] == math.ceil(749 / 16) and dynamic["tokens"] == static["tokens"] == 1_498
        assert static["loss"] == evaluate(model, valid, bptt=16)[0]
        if exact:
            assert torch.equal(dynamic["losses"], static["losses"])
            assert dynamic["loss"] == static["loss"]
        else:
            torch.testing.assert_close(dynamic["losses"], static["losses"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, lr, gain", [("rms", 2e-3, 0.2), ("sgd", 0.2, 0.3)])
def test_a_repeat_is_learnt_only_after_its_first_half_is_scored(trained, method, lr, gain):
    """Text whose second half repeats its first exactly, one segment per half: the first half's
    dynamic losses equal static evaluation's bit for bit (nothing unscored was learnt from); after
    the one update on the first half, the repeat's dynamic bpc is well below static (0.37 and 0.56
    bits lower when this was written, for a 64-byte half)."""
    _, model, corpus = trained
    half = corpus[28_500:28_564]  # 64 bytes of the test split
    text = stream_of(half + half)
    settings = DynamicEval(method=method, lr=lr, decay=0.0, bptt=len(half))
    static = score_segments(model, text, bptt=len(half), keep_losses=True)["losses"][:, 0]
    dynamic = evaluate_dynamic(model, text, settings, bptt=16, stats_stream=train_stream(corpus),
                               keep_losses=True)["losses"][:, 0]
    assert torch.equal(dynamic[:len(half)], static[:len(half)])
    repeat_static, repeat_dynamic = bits(static[len(half):]), bits(dynamic[len(half):])
    assert repeat_dynamic < repeat_static - gain, (repeat_static, repeat_dynamic)


def test_no_loss_depends_on_text_after_it(trained):
    """Short segments (16 bytes, not dividing the half): the losses of the first half are the same
    bits whether the second half repeats it or is other text. A rule that stepped before scoring,
    or on a segment reaching past the scored bytes, would see the second half early."""
    _, model, corpus = trained
    half = corpus[28_500:28_700]
    other = corpus[27_100:27_300]
    settings = DynamicEval(method="sgd", lr=1.0, decay=0.0, bptt=16)
    a = evaluate_dynamic(model, stream_of(half + half), settings, bptt=16, keep_losses=True)["losses"][:, 0]
    b = evaluate_dynamic(model, stream_of(half + other), settings, bptt=16, keep_losses=True)["losses"][:, 0]
    # Position 199 predicts the first byte of the second half: the last one that may differ.
    assert torch.equal(a[:len(half) - 1], b[:len(half) - 1])
    assert not torch.equal(a[len(half):], b[len(half):])


def test_a_planted_pattern_is_scored_without_knowing_it(trained):
    """40 random bytes >= 128 (never seen in training) planted twice in prose, the first time inside
    one 48-byte segment (bytes 100-139, predicted at positions 99-138 of segment 96-143). That
    occurrence is scored before any update has seen it: the same bits as for the text cut right
    after that segment, and far above the second occurrence's, which comes after the update on the
    first (an update-then-score rule would have learnt both), itself far below static."""
    _, model, corpus = trained
    generator = torch.Generator().manual_seed(23)
    pattern = bytes((torch.randint(128, 256, (40,), generator=generator)).tolist())
    prose = corpus[28_500:]
    first, second = 100, 100 + 40 + 100
    text = prose[:100] + pattern + prose[100:200] + pattern + prose[200:300]
    settings = DynamicEval(method="sgd", lr=0.2, decay=0.0, bptt=48)
    dynamic = evaluate_dynamic(model, stream_of(text), settings, bptt=16, keep_losses=True)["losses"][:, 0]
    cut = evaluate_dynamic(model, stream_of(text[:144 + 1]), settings, bptt=16, keep_losses=True)["losses"][:, 0]
    static = score_segments(model, stream_of(text), bptt=48, keep_losses=True)["losses"][:, 0]

    def on(losses, start):  # the losses of predicting the pattern's bytes (position i predicts byte i + 1)
        return losses[start - 1:start + 39]
    assert torch.isfinite(dynamic).all()
    assert torch.equal(on(dynamic, first), on(cut, first))
    unseen, seen = bits(on(dynamic, first)), bits(on(dynamic, second))
    assert unseen > seen + 1.0, (unseen, seen)  # an update-then-score rule would have learnt both
    assert seen < bits(on(static, second)) - 1.0, (seen, bits(on(static, second)))


def test_dynamic_evaluation_gains_on_real_text_no_test_wrote(trained, capsys):
    """CPython's own LICENSE.txt (real English, not the embedded docstring corpus, written by no
    test): with the default settings, dynamic bpc is below static bpc."""
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not licence.is_file():
        pytest.skip(f"this Python installation has no {licence} (some distributions leave it out)")
    _, model, corpus = trained
    text = stream_of(licence.read_bytes(), columns=4)
    static = score_segments(model, text, bptt=16)
    dynamic = evaluate_dynamic(model, text, DynamicEval(), bptt=16, stats_stream=train_stream(corpus, 4))
    with capsys.disabled():
        print(f"\n{licence.name} ({dynamic['tokens']:,} bytes): static {static['loss'] / LN2:.4f} bpc, "
              f"dynamic {dynamic['bpc']:.4f} bpc")
    assert dynamic["bpc"] < static["loss"] / LN2 - 0.05


def test_the_weights_are_the_trained_ones_afterwards(trained):
    _, model, corpus = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_dynamic(model, stream_of(corpus[28_500:29_000]), DynamicEval(method="sgd", lr=1.0), bptt=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_backend_with_a_backward_adapts(trained, backend):
    """The torch and triton backends (triton in its interpreter on a CPU) against the reference."""
    path, reference_model, corpus = trained
    model, _ = sharnn_fast.load_checkpoint(path, backend=backend)
    text = stream_of(corpus[28_500:28_700], columns=2)
    settings = DynamicEval(stats_segments=4)
    expected = evaluate_dynamic(reference_model, text, settings, bptt=16, stats_stream=train_stream(corpus, 2))
    result = evaluate_dynamic(model, text, settings, bptt=16, stats_stream=train_stream(corpus, 2))
    assert result["updates"] == expected["updates"] == 7
    assert result["bpc"] == pytest.approx(expected["bpc"], rel=1e-4)


def test_bf16_autocast_on_cpu_adapts_too(trained):
    _, model, corpus = trained
    text = stream_of(corpus[28_500:29_500], columns=2)
    fp32 = evaluate_dynamic(model, text, DynamicEval(), bptt=16, stats_stream=train_stream(corpus, 2))
    bf16 = evaluate_dynamic(model, text, DynamicEval(), bptt=16, stats_stream=train_stream(corpus, 2),
                            precision="bf16")
    assert bf16["skipped_updates"] == 0 and abs(bf16["bpc"] - fp32["bpc"]) < 0.05, (bf16["bpc"], fp32["bpc"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_dynamic_evaluation_on_cuda(trained, precision):
    """On a GPU with the auto backend: fp16 goes through a GradScaler; the result is close to fp32's."""
    path, _, corpus = trained
    model, _ = sharnn_fast.load_checkpoint(path, map_location="cuda")
    text = stream_of(corpus[28_500:29_500], columns=2)
    static = score_segments(model, text, bptt=16, precision=precision)
    dynamic = evaluate_dynamic(model, text, DynamicEval(), bptt=16, stats_stream=train_stream(corpus, 2),
                               precision=precision)
    assert math.isfinite(dynamic["bpc"]) and dynamic["bpc"] < static["loss"] / LN2


def test_bad_settings_in_python_get_one_clear_error():
    for kwargs, fragment in ((dict(lr=-1.0), "learning rate must be a number >= 0"),
                             (dict(decay=1.5), "decay must be a number in [0, 1]"),
                             (dict(bptt=0), "segment length (bptt) must be an integer >= 1"),
                             (dict(method="adam"), "must be rms or sgd")):
        with pytest.raises(UserInputError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            DynamicEval(**kwargs)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_prints_static_and_dynamic_side_by_side_and_leaves_the_checkpoint(trained, capsys):
    path, _, _ = trained
    digest = sha256(path)
    result = run_sharnn("eval", "--checkpoint", path, "--batch-size", "2", "--dynamic", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens_per_s"] > 0 and out["dynamic"]["tokens_per_s"] > 0
    assert out["dynamic"]["tokens"] == out["tokens"] == 1_498
    assert (out["dynamic"]["method"], out["dynamic"]["bptt"], out["dynamic"]["updates"]) == ("rms", 16, 47)
    assert out["dynamic"]["stats_segments"] == 100 and out["dynamic"]["bpc"] < out["bpc"]
    text = run_main(capsys, "eval", "--checkpoint", path, "--batch-size", "2", "--dynamic", "--dynamic-method",
                    "sgd", "--dynamic-lr", "0.5", "--dynamic-decay", "0", "--dynamic-bptt", "8")
    assert text.returncode == 0, text.stderr
    static_line, dynamic_line = text.stdout.strip().splitlines()
    assert static_line.startswith("valid: ") and " tokens/s" in static_line
    assert dynamic_line.startswith("valid: ") and " bpc dynamic (" in dynamic_line
    assert "sgd, lr 0.5, decay 0, segments of 8 bytes (94 updates)" in dynamic_line
    assert sha256(path) == digest


def test_cli_bad_dynamic_flags_get_one_line_and_exit_2(trained, capsys):
    path, _, _ = trained
    assert_one_line_error(run_sharnn("eval", "--checkpoint", path, "--dynamic", "--dynamic-lr", "0"),
                          "argument --dynamic-lr", "expected a learning rate > 0, got '0'")
    cases = [
        (["--dynamic", "--dynamic-lr", "-0.1"], ["argument --dynamic-lr", "expected a learning rate > 0"]),
        (["--dynamic", "--dynamic-lr", "nan"], ["argument --dynamic-lr", "expected a learning rate > 0"]),
        (["--dynamic", "--dynamic-decay", "1.5"], ["argument --dynamic-decay", "expected a number in [0, 1]"]),
        (["--dynamic", "--dynamic-decay", "-0.01"], ["argument --dynamic-decay", "expected a number in [0, 1]"]),
        (["--dynamic", "--dynamic-bptt", "0"], ["argument --dynamic-bptt", "expected a positive integer"]),
        (["--dynamic-lr", "0.1", "--dynamic-bptt", "8"], ["--dynamic-lr, --dynamic-bptt only apply", "add --dynamic"]),
        (["--dynamic", "--split", "train"], ["--dynamic-method rms collects its gradient statistics on the train"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_main(capsys, "eval", "--checkpoint", path, *args), *fragments)


def test_cli_help_documents_dynamic_evaluation():
    result = run_sharnn("eval", "--help")
    assert result.returncode == 0
    for text in ("--dynamic-lr", "--dynamic-decay", "--dynamic-bptt", "--dynamic-method", "Krause et al. 2018",
                 "section 4", "scored"):
        assert text in result.stdout, text


def test_dynamic_train_split_with_sgd_runs(trained):
    """sgd needs no training statistics, so it may evaluate the train split."""
    path, _, _ = trained
    result = run_sharnn("eval", "--checkpoint", path, "--split", "train", "--batch-size", "8", "--dynamic",
                        "--dynamic-method", "sgd", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dynamic"]["stats_segments"] == 0

