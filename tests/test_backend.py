import pytest
import torch

import sharnn_fast
from op_cases import BOOM
from sharnn_fast import BackendUnavailableError, SHARNN, ops
from sharnn_fast.backend import ENV_VAR


def test_default_is_auto_and_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert sharnn_fast.get_backend() == "auto"
    ops.boom(**BOOM.inputs())
    assert "boom: torch (auto on cpu" in sharnn_fast.explain()


def test_precedence_call_over_process_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert sharnn_fast.get_backend() == "reference"
    ops.boom(**BOOM.inputs())
    assert "boom: reference (requested explicitly" in sharnn_fast.explain()
    sharnn_fast.set_backend("torch")
    assert sharnn_fast.get_backend() == "torch"
    ops.boom(**BOOM.inputs(), backend="reference")
    assert "boom: reference" in sharnn_fast.explain()
    ops.boom(**BOOM.inputs())
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
        ops.boom(**BOOM.inputs(), backend=name)


def test_auto_skips_backends_that_cannot_run(monkeypatch):
    monkeypatch.setattr(sharnn_fast.backend, "_AUTO_PREFERENCE", {"boom": {"cpu": ("cuda", "triton", "torch")}})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.boom(**BOOM.inputs())
    report = sharnn_fast.explain()
    assert "boom: torch (auto on cpu, static preference; skipped cuda (" in report and "triton (" in report


def test_invalid_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        sharnn_fast.set_backend("fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.boom(**BOOM.inputs(), backend="Torch")
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} must be one of"):
        ops.boom(**BOOM.inputs())


# The paper's size (B 16, I = H = 1024) on an H100/H200 (sm_90), then one condition broken at a time.
@pytest.mark.parametrize("dtype, B, I, H, capability, cudnn_first", [
    (torch.float16, 16, 1024, 1024, (9, 0), True),
    (torch.float16, 128, 256, 128, (8, 0), True),
    (torch.bfloat16, 16, 1024, 1024, (9, 0), True),   # through cuDNN's float16 LSTM (torch_native.py)
    (torch.bfloat16, 10, 1024, 1024, (9, 0), False),  # ... only where its persistent algorithm runs
    (torch.float32, 16, 1024, 1024, (9, 0), False),
    (torch.float16, 10, 1024, 1024, (9, 0), False),   # B not a multiple of 8 (sharnn eval's 10 columns)
    (torch.float16, 136, 1024, 1024, (9, 0), False),  # B over 128
    (torch.float16, 16, 1024, 1152, (9, 0), False),   # H over 1024
    (torch.float16, 16, 1000, 1024, (9, 0), False),   # I not a multiple of 128
    (torch.float16, 16, 1024, 1000, (9, 0), False),   # H not a multiple of 128
    (torch.float16, 16, 1024, 1024, (7, 5), False),   # before Ampere
    (torch.float16, 16, 1024, 1024, (8, 6), False),   # sm_86 (A40, A10, RTX 3090) is excluded
    (torch.float16, 16, 1024, 1024, (8, 9, 58), False),  # fewer than 98 SMs (L4)
    (torch.bfloat16, 16, 1024, 1024, (8, 9, 58), False),
    (torch.float16, 16, 1024, 1024, (8, 9, 128), True),  # RTX 4090
    (torch.bfloat16, 16, 128, 128, (9, 0), False),    # H <= 128: bfloat16 has cuDNN's small-H algorithm
])
def test_auto_lstm_on_cuda_prefers_cudnn_where_pytorch_runs_its_persistent_algorithm(
        monkeypatch, dtype, B, I, H, capability, cudnn_first):
    """The rule of PyTorch's cudnn/RNN.cpp (get_algo), checked without a GPU: a stand-in for x says
    it is on CUDA, and the device's properties are patched (capability, and SM count: 132 unless
    given)."""
    from types import SimpleNamespace

    from sharnn_fast import backend
    major, minor, sms = (*capability, 132)[:3]
    properties = SimpleNamespace(major=major, minor=minor, multi_processor_count=sms)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    x = SimpleNamespace(shape=(7, B, I), is_cuda=True, device=torch.device("cuda", 0))
    weight_hh = SimpleNamespace(shape=(4 * H, H))
    order, because = backend._AUTO_PREFERENCE["lstm"]["cuda"]((x, None, weight_hh, None, None, None), dtype)
    assert sorted(order) == sorted(backend.BACKENDS)
    assert order[0] == ("torch" if cudnn_first else "cuda")
    assert (because is not None) == cudnn_first
    if because is not None:
        assert because.startswith(str(dtype).removeprefix("torch.") + " at these sizes: cuDNN's persistent")
    if dtype == torch.bfloat16:  # under torch.compile or CUDA graph capture it runs bfloat16 as it is
        for module, switch in ((torch.compiler, "is_compiling"), (torch.cuda, "is_current_stream_capturing")):
            with monkeypatch.context() as patch:
                patch.setattr(module, switch, lambda: True)
                order, because = backend._AUTO_PREFERENCE["lstm"]["cuda"](
                    (x, None, weight_hh, None, None, None), dtype)
                assert order[0] == "cuda" and because is None, switch


@pytest.mark.gpu
def test_auto_lstm_on_a_gpu_runs_cudnn_in_fp16_and_bf16_and_the_cuda_kernel_otherwise():
    from sharnn_fast import build_info
    w = [torch.randn(4 * 128, 128, device="cuda") * 0.1 for _ in range(2)] + [torch.zeros(512, device="cuda")] * 2
    for B, dtype, expected in [(16, torch.float16, "torch"), (10, torch.float16, None), (16, torch.bfloat16, "torch"),
                               (10, torch.bfloat16, None)]:
        x = torch.randn(5, B, 128, device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            ops.lstm(x, *w)
        line = [s for s in sharnn_fast.explain().splitlines() if s.startswith("lstm:")][0]
        if expected == "torch":
            name = str(dtype).removeprefix("torch.")
            assert line.startswith(f"lstm: torch (auto on cuda, static preference ({name} at these sizes"), line
            assert ("cuDNN's float16 LSTM for bfloat16 inputs" in line) == (dtype == torch.bfloat16), line
        else:
            assert line.startswith("lstm: cuda" if build_info()["cuda"] else "lstm: triton"), line
