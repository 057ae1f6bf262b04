"""ops.lstm backends side by side: forward (no grad) and forward+backward, in every dtype.

GPU: the paper's size (T 1024, B 16, I = H = 1024) in float32, float16 and bfloat16, and the same
with B 1 for inference (forward only). CPU: a small size in float32, without the triton backend (its
interpreter is not a benchmark). Each row reports
time (also per sequential step), achieved TFLOP/s, the physical limit (conftest's `peaks`) and, on
CUDA, peak memory; the baseline of each group is
nn.LSTM's kernel (backend "torch": cuDNN on CUDA) in float32. Targets (GPU, bf16 triton): faster
than 2x the step-by-step reference, within 1.5x of the baseline.
"""
import importlib

import pytest
import torch

from conftest import synchronize
from sharnn_fast import ops
from sharnn_fast.ops.lstm import IMPLEMENTATIONS

SIZES = {
    "cuda": dict(T=1024, B=16, I=1024, H=1024, rounds=10),
    "cpu": dict(T=64, B=4, I=128, H=128, rounds=5),
}
INFERENCE_BATCH = 1  # generation and evaluation run one sequence: forward only, on GPU
DTYPES = ["float32", "float16", "bfloat16"]
# (variant, backend). "triton-launches" is triton with CUDA graphs off: the pair measures what the
# graphs buy. Every variant whose backend's why_not refuses the inputs is skipped with that reason.
VARIANTS = [
    ("reference", "reference"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("triton-launches", "triton"),
    ("cuda", "cuda"),  # the persistent kernel (sharnn_fast/ops/lstm/cuda.py)
]
MODES = ["forward", "forward+backward", "inference B 1"]


def lstm_args(size, device, dtype, requires_grad):
    T, B, I, H = size["T"], size["B"], size["I"], size["H"]
    k = H ** -0.5

    def u(*shape):
        return torch.empty(*shape, device=device, dtype=dtype).uniform_(-k, k).requires_grad_(requires_grad)
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=requires_grad)
    hx = tuple(0.5 * torch.randn(1, B, H, device=device, dtype=dtype) for _ in range(2))
    hx = tuple(h.requires_grad_(requires_grad) for h in hx)
    return x, u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H), hx


def lstm_work(size, mode):
    """(matmul FLOPs, bytes that must move at least once, sequential dependent steps). Forward: the
    input projection and the recurrent product; read x and the weights, write y. The backward
    doubles the FLOPs, reads dy, writes dx and the weight gradients, and is a second recurrence."""
    T, B, I, H = size["T"], size["B"], size["I"], size["H"]
    flops = 2 * T * B * 4 * H * (I + H)
    elements = T * B * I + 4 * H * (I + H + 2) + T * B * H
    if mode == "forward+backward":
        return 3 * flops, 2 * elements, 2 * T
    return flops, elements, T


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("variant, backend", VARIANTS)
def test_lstm(benchmark, record, monkeypatch, device, variant, backend, dtype_name, mode):
    size = SIZES[device.type]
    if mode == "inference B 1":
        if device.type != "cuda":
            pytest.skip("the B 1 inference case is benchmarked on GPU only")
        size = dict(size, B=INFERENCE_BATCH)
    dtype = getattr(torch, dtype_name)
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("CPU benchmarks run float32 only")
    if device.type == "cpu" and backend == "triton":
        pytest.skip("Triton on CPU runs in its interpreter, which is not a benchmark")
    torch.manual_seed(0)
    args = lstm_args(size, device, dtype, requires_grad=mode == "forward+backward")
    reason = IMPLEMENTATIONS[backend].why_not(*args)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if variant == "triton-launches":
        monkeypatch.setenv(importlib.import_module("sharnn_fast.ops.lstm.triton").GRAPHS_ENV, "0")
    dy = torch.randn(size["T"], size["B"], size["H"], device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            ops.lstm(*args, backend=backend)
        synchronize(device)

    def forward_backward():
        for t in (*args[:5], *args[5]):
            t.grad = None
        y, _ = ops.lstm(*args, backend=backend)
        y.backward(dy)
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    group = f"lstm {mode}"
    benchmark.group = group
    # Two warm-up rounds: the first compiles the kernels, the second captures the CUDA graphs.
    benchmark.pedantic(forward_backward if mode == "forward+backward" else forward, rounds=size["rounds"],
                       warmup_rounds=2, iterations=1)
    flops, elements, steps = lstm_work(size, mode)
    extra = {}
    if benchmark.stats is not None:  # time per sequential step: what the launch overhead shows in
        extra["per_step_us"] = 1e6 * benchmark.stats.stats.median / steps
    record(group, f"{variant} {dtype_name}", tokens=size["T"] * size["B"], flops=flops,
           bytes=elements * args[0].element_size(), steps=steps,
           baseline=backend == "torch" and dtype == torch.float32,
           size={k: v for k, v in size.items() if k != "rounds"}, **extra)
