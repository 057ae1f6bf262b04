"""ops.lstm backends side by side: forward (no grad) and forward+backward, in every dtype.

GPU: the paper's size (T 1024, B 16, I = H = 1024) in float32, float16 and bfloat16, and the same
with B 1 for inference (forward only). CPU: a small size in float32, without the triton backend (its
interpreter is not a benchmark). Each case is one mode and dtype, its backends timed interleaved
(conftest's ``bench``) against nn.LSTM's kernel in float32 (backend "torch": cuDNN on CUDA; named
"torch float32" in the float16 and bfloat16 cases). Each row reports time (also per sequential
step), achieved TFLOP/s, the limit (benchmarks/harness/peaks.py) and, on CUDA, peak memory. In
bfloat16 at the paper's size "torch" runs cuDNN's float16 kernel (ops/lstm/torch_native.py);
"torch-bf16-cudnn" is cuDNN's own bfloat16 LSTM, which it replaced.
Targets (GPU, bf16 triton): faster than 2x the step-by-step reference, within 1.5x of the baseline.
"""
import importlib
import os

import pytest
import torch

from conftest import Variant
from sharnn_fast import ops
from sharnn_fast.ops.lstm import IMPLEMENTATIONS, torch_native

SIZES = {
    "cuda": dict(T=1024, B=16, I=1024, H=1024),
    "cpu": dict(T=64, B=4, I=128, H=128),
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


def lstm_step(args, dy, backend, mode, graphs=None):
    """The function timed: forward without grad, or forward+backward. ``graphs`` sets the triton
    backend's CUDA graphs switch for this variant only (variants run interleaved)."""
    def forward():
        with torch.no_grad():
            ops.lstm(*args, backend=backend)

    def forward_backward():
        for t in (*args[:5], *args[5]):
            t.grad = None
        y, _ = ops.lstm(*args, backend=backend)
        y.backward(dy)

    run = forward_backward if mode == "forward+backward" else forward
    if graphs is None:
        return run
    graphs_env = importlib.import_module("sharnn_fast.ops.lstm.triton").GRAPHS_ENV

    def run_with_graphs_setting():
        saved = os.environ.get(graphs_env)
        os.environ[graphs_env] = graphs
        try:
            run()
        finally:
            if saved is None:
                del os.environ[graphs_env]
            else:
                os.environ[graphs_env] = saved
    return run_with_graphs_setting


def _without_float16_route(run):
    """``run`` with the torch backend's bf16-through-float16 LSTM route off: cuDNN's own bf16 LSTM."""
    def run_in_bfloat16():
        route = torch_native.lstm_bfloat16_via_float16
        torch_native.lstm_bfloat16_via_float16 = lambda x, weight_hh, dtype: False
        try:
            run()
        finally:
            torch_native.lstm_bfloat16_via_float16 = route
    return run_in_bfloat16


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_lstm(bench, device, dtype_name, mode):
    size = SIZES[device.type]
    if mode == "inference B 1":
        if device.type != "cuda":
            pytest.skip("the B 1 inference case is benchmarked on GPU only")
        size = dict(size, B=INFERENCE_BATCH)
    if device.type == "cpu" and dtype_name != "float32":
        pytest.skip("CPU benchmarks run float32 only")
    requires_grad = mode == "forward+backward"

    def inputs(dtype_name):
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        args = lstm_args(size, device, dtype, requires_grad)
        return args, torch.randn(size["T"], size["B"], size["H"], device=device, dtype=dtype)

    def work(dtype_name):
        flops, elements, steps = lstm_work(size, mode)
        return dict(tokens=size["T"] * size["B"], flops=flops, steps=steps,
                    bytes=elements * getattr(torch, dtype_name).itemsize)

    args, dy = inputs(dtype_name)
    variants, skipped = {}, {}
    baseline = "torch"
    if dtype_name != "float32":  # every dtype is compared with nn.LSTM's kernel in float32
        baseline = "torch float32"
        args32, dy32 = inputs("float32")
        variants[baseline] = Variant(lstm_step(args32, dy32, "torch", mode), size=dict(dtype="float32"),
                                     work=work("float32"))
    for variant, backend in VARIANTS:
        if device.type == "cuda" and backend == "reference" and dtype_name != "float32":
            skipped[variant] = ("the step-by-step reference is timed in float32 only on a GPU (0.2-0.7 s a "
                                "call at the paper's size; it is the same Python loop in every dtype)")
            continue
        if device.type == "cpu" and backend == "triton":
            skipped[variant] = "Triton on CPU runs in its interpreter, which is not a benchmark"
            continue
        reason = IMPLEMENTATIONS[backend].why_not(*args)
        if reason is not None:
            skipped[variant] = reason
            continue
        variants[variant] = lstm_step(args, dy, backend, mode, graphs="0" if variant == "triton-launches" else None)
    x, weight_hh = args[0], args[2]
    if device.type == "cuda" and torch_native.lstm_bfloat16_via_float16(x, weight_hh, x.dtype):
        # "torch" runs this bf16 LSTM through cuDNN's float16 kernel; this variant is what it replaced
        variants["torch-bf16-cudnn"] = _without_float16_route(lstm_step(args, dy, "torch", mode))
    size = dict(size, dtype=dtype_name)
    bench.compare(f"lstm {mode} {dtype_name}", variants, baseline=baseline, size=size, work=work(dtype_name),
                  skipped=skipped)
