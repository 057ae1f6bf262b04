"""A checkpoint's backend is a preference: a checkpoint trained with the triton or cuda backend
loads, evaluates and generates on a machine where that backend cannot run."""
import pytest
import torch

import sharnn_fast
from sharnn_fast import backend as backend_module
from sharnn_fast.training import train
from sharnn_fast.training.loop import evaluate_checkpoint
from training_helpers import SMALL_CONFIG, rewrite_checkpoint, run_sharnn


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus_file):
    """last.pt trained with the reference backend, and the same as a CUDA machine's run would save
    it (config backend "cuda", which this CPU cannot run)."""
    folder = tmp_path_factory.mktemp("run")
    train("tiny", dict(SMALL_CONFIG, data=str(corpus_file), max_steps=2, backend="reference"), save_dir=folder)
    rewrite_checkpoint(folder / "last.pt", folder / "cuda.pt", lambda p: p["config"].update(backend="cuda"))
    return folder


def test_a_cuda_checkpoint_evaluates_and_generates_on_a_cpu(checkpoints):
    evaluated = run_sharnn("eval", "--checkpoint", checkpoints / "cuda.pt", "--batch-size", "2", "--json",
                           "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    reference = evaluate_checkpoint(checkpoints / "last.pt", batch_size=2, device="cpu")
    assert '"bpc": ' in evaluated.stdout
    auto = evaluate_checkpoint(checkpoints / "cuda.pt", batch_size=2, device="cpu")
    assert auto["bpc"] == pytest.approx(reference["bpc"], rel=1e-5)
    generated = run_sharnn("generate", "--checkpoint", checkpoints / "cuda.pt", "--prompt", "a", "--greedy",
                           "--max-new-tokens", "5", "--device", "cpu")
    assert generated.returncode == 0, generated.stderr
    explicit = run_sharnn("eval", "--checkpoint", checkpoints / "cuda.pt", "--batch-size", "2", "--device", "cpu",
                          "--backend", "reference")
    assert explicit.returncode == 0, explicit.stderr


def test_which_backend_a_loaded_checkpoint_gets(checkpoints, monkeypatch):
    monkeypatch.delenv(backend_module.ENV_VAR, raising=False)
    model, config = sharnn_fast.load_checkpoint(checkpoints / "cuda.pt")
    assert model.backend is None and config["backend"] == "cuda"  # cannot run here: auto
    model, _ = sharnn_fast.load_checkpoint(checkpoints / "last.pt")
    assert model.backend == "reference"  # the saved preference, where it runs
    model, _ = sharnn_fast.load_checkpoint(checkpoints / "cuda.pt", backend="torch")
    assert model.backend == "torch"  # an explicit choice wins
    monkeypatch.setenv(backend_module.ENV_VAR, "reference")
    model, _ = sharnn_fast.load_checkpoint(checkpoints / "last.pt")
    assert model.backend is None and backend_module.get_backend() == "reference"  # the environment wins
    with pytest.raises(ValueError, match="--backend must be one of"):
        sharnn_fast.load_checkpoint(checkpoints / "last.pt", backend="fast")
    model, _ = sharnn_fast.load_checkpoint(checkpoints / "last.pt", backend="cuda")
    with pytest.raises(backend_module.BackendUnavailableError, match="backend 'cuda' cannot run"):
        model(torch.zeros(1, 1, dtype=torch.long))  # explicit and impossible: says why
