import pytest
import torch

import sharnn_fast
from sharnn_fast import BackendUnavailableError, SHARNN, ops
from sharnn_fast.backend import ENV_VAR


def small_boom():
    return torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)


def test_default_is_auto_and_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert sharnn_fast.get_backend() == "auto"
    ops.boom(*small_boom())
    assert "boom: torch (auto on cpu" in sharnn_fast.explain()


def test_precedence_call_over_process_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert sharnn_fast.get_backend() == "reference"
    ops.boom(*small_boom())
    assert "boom: reference (requested explicitly" in sharnn_fast.explain()
    sharnn_fast.set_backend("torch")
    assert sharnn_fast.get_backend() == "torch"
    ops.boom(*small_boom(), backend="reference")
    assert "boom: reference" in sharnn_fast.explain()
    ops.boom(*small_boom())
    assert "boom: torch" in sharnn_fast.explain()
    sharnn_fast.set_backend(None)
    assert sharnn_fast.get_backend() == "reference"


def test_model_backend_reaches_every_op():
    model = SHARNN("LSTM", 20, 8, 16, 2, backend="reference")
    model(torch.randint(0, 20, (4, 2)))
    report = sharnn_fast.explain()
    for op in ("lstm", "attention", "boom"):
        assert f"{op}: reference (requested explicitly" in report
    model.backend = "torch"
    model(torch.randint(0, 20, (4, 2)))
    assert "lstm: torch" in sharnn_fast.explain()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_explicit_backend_that_cannot_run_says_why(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without it Triton needs CUDA tensors
    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' cannot run boom: .*backend='torch'"):
        ops.boom(*small_boom(), backend=name)


def test_auto_skips_backends_that_cannot_run(monkeypatch):
    monkeypatch.setattr(sharnn_fast.backend, "_AUTO_PREFERENCE", {"boom": {"cpu": ("cuda", "triton", "torch")}})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.boom(*small_boom())
    report = sharnn_fast.explain()
    assert "boom: torch (auto on cpu, static preference; skipped cuda (" in report and "triton (" in report


def test_invalid_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        sharnn_fast.set_backend("fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.boom(*small_boom(), backend="Torch")
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} must be one of"):
        ops.boom(*small_boom())
