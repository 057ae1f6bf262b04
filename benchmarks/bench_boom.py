"""ops.boom per backend (triton, torch, reference), forward and forward+backward, in training mode
with the paper's dropout of 0.1.

GPU: the paper's size (16 x 1024 tokens, d 1024, F 4096) in bfloat16. CPU: a small size in float32,
without triton (its interpreter is for tests, not timing). Besides time, TFLOP/s and peak memory,
each case reports saved_activation_mib (GPU only): what the forward leaves allocated for backward,
beyond its output."""
import pytest
import torch

from conftest import synchronize
from sharnn_fast import ops

BOOM_SIZES = {
    "cuda": dict(T=1024, B=16, d=1024, F=4096, dtype="bfloat16", rounds=50),
    "cpu": dict(T=64, B=4, d=256, F=1024, dtype="float32", rounds=5),
}
VARIANTS = ["torch", "reference", "triton"]  # torch first: the baseline
MODES = ["forward", "forward+backward"]
DROPOUT = 0.1


def boom_case(size, device):
    """Inputs and the upstream gradient at ``size``, every input requiring grad."""
    dtype = getattr(torch, size["dtype"])
    T, B, d, F = size["T"], size["B"], size["d"], size["F"]
    x = torch.randn(T, B, d, device=device, dtype=dtype, requires_grad=True)  # [T, B, d]
    weight = (torch.randn(F, d, device=device) * d ** -0.5).to(dtype).requires_grad_(True)  # [F, d]
    bias = (0.1 * torch.randn(F, device=device)).to(dtype).requires_grad_(True)  # [F]
    dy = torch.randn(T, B, d, device=device, dtype=dtype)  # [T, B, d]
    return x, weight, bias, dy


def saved_activation_bytes(run, device):
    """Memory the forward leaves allocated while its output is alive, beyond the output itself."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    y = run()
    synchronize(device)
    saved = torch.cuda.memory_allocated(device) - before - y.numel() * y.element_size()
    del y
    return saved


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_boom(benchmark, record, variant, mode, device):
    if variant == "triton" and device.type != "cuda":
        pytest.skip("triton runs on CPU only in its interpreter, which is not a benchmark")
    size = BOOM_SIZES[device.type]
    torch.manual_seed(0)
    x, weight, bias, dy = boom_case(size, device)

    def forward():
        return ops.boom(x, weight, bias, dropout_p=DROPOUT, training=True, backend=variant)

    def step():
        if mode == "forward":
            forward()
        else:
            x.grad = weight.grad = bias.grad = None
            forward().backward(dy)
        synchronize(device)

    extra = {}
    if device.type == "cuda":
        extra["saved_activation_mib"] = saved_activation_bytes(forward, device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    group = f"boom {mode}"
    benchmark.group = group
    benchmark.pedantic(step, rounds=size["rounds"], warmup_rounds=2, iterations=1)

    N, d, F = size["T"] * size["B"], size["d"], size["F"]
    element = x.element_size()
    # Model FLOPs: the GEMM x W^T, and in backward dX and dW (a recomputed z is not counted).
    gemms = 1 if mode == "forward" else 3
    # Least memory traffic: read x and W, write y; backward also reads dy and writes dX and dW.
    moved = (2 * N * d + F * d) if mode == "forward" else (4 * N * d + 2 * F * d)
    record(group, variant, tokens=N, flops=gemms * 2 * N * d * F, bytes=moved * element,
           baseline=variant == "torch", size={k: v for k, v in size.items() if k != "rounds"}, **extra)
