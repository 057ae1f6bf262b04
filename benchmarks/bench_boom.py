"""ops.boom per backend (triton, torch, reference), forward and forward+backward, in training mode
with the paper's dropout of 0.1.

GPU: the paper's size (16 x 1024 tokens, d 1024, F 4096) in bfloat16. CPU: a small size in float32,
without triton (its interpreter is for tests, not timing). The backends are timed interleaved
against "torch" (conftest's ``bench``). Besides time, TFLOP/s and peak memory, each case reports
saved_activation_mib (GPU only): what the forward leaves allocated for backward, beyond its output."""
import pytest
import torch

from conftest import Variant, synchronize
from sharnn_fast import ops

BOOM_SIZES = {
    "cuda": dict(T=1024, B=16, d=1024, F=4096, dtype="bfloat16"),
    "cpu": dict(T=64, B=4, d=256, F=1024, dtype="float32"),
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
def test_boom(bench, mode, device):
    size = BOOM_SIZES[device.type]
    torch.manual_seed(0)
    x, weight, bias, dy = boom_case(size, device)

    def step(backend):
        def forward():
            return ops.boom(x, weight, bias, dropout_p=DROPOUT, training=True, backend=backend)

        def forward_backward():
            x.grad = weight.grad = bias.grad = None
            forward().backward(dy)
        return forward, (forward if mode == "forward" else forward_backward)

    variants, skipped = {}, {}
    for backend in VARIANTS:
        if backend == "triton" and device.type != "cuda":
            skipped[backend] = "triton runs on CPU only in its interpreter, which is not a benchmark"
            continue
        forward, run = step(backend)
        info = None
        if device.type == "cuda" and bench.timing:
            info = dict(saved_activation_mib=round(saved_activation_bytes(forward, device) / 2**20, 1))
        variants[backend] = Variant(run, info=info)

    N, d, F = size["T"] * size["B"], size["d"], size["F"]
    # Model FLOPs: the GEMM x W^T, and in backward dX and dW (a recomputed z is not counted).
    gemms = 1 if mode == "forward" else 3
    # Least memory traffic: read x and W, write y; backward also reads dy and writes dX and dW.
    moved = (2 * N * d + F * d) if mode == "forward" else (4 * N * d + 2 * F * d)
    bench.compare(f"boom {mode}", variants, baseline="torch", size=size, skipped=skipped,
                  work=dict(tokens=N, flops=gemms * 2 * N * d * F, bytes=moved * x.element_size()))
