"""ops.attention per backend (triton, torch = scaled_dot_product_attention, reference), forward and
forward+backward, with and without a memory in front of the keys.

The forward runs as in evaluation (no dropout); forward+backward as in training, with the paper's
dropout of 0.1 on the attention weights. GPU: the paper's sizes (Tq 1024, Tk 1024 and 5000, one head
of d 1024, batch 16) in bfloat16. CPU: a small size in float32, without triton (its interpreter is
for tests, not timing). Each case reports time, TFLOP/s (model FLOPs: the causal half only, no
recomputation counted), peak memory (GPU), and for the torch variant which SDPA backend ran. The
backends are timed interleaved against "torch" (conftest's ``bench``).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import Variant
from sharnn_fast import ops
from sharnn_fast.ops.attention.torch_native import attention_torch

ATTENTION_SIZES = {
    "cuda": dict(Tq=1024, Tk=(1024, 5000), B=16, d=1024, dtype="bfloat16"),
    "cpu": dict(Tq=64, Tk=(64, 160), B=2, d=64, dtype="float32"),
}
VARIANTS = ["torch", "reference", "triton"]  # torch first: the baseline
MODES = ["forward", "forward+backward"]
DROPOUT = 0.1  # the paper's dropouth, applied to the weights in training


def sdpa_backend_used(q, k, v, dropout_p):
    """The SDPA backend that runs these inputs: the first of SDPA's priority order that accepts
    them (SDPA's own choice), found by allowing one backend at a time."""
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])()
    for backend in (SDPBackend(b) if isinstance(b, int) else b for b in order):
        if backend == SDPBackend.OVERRIDEABLE:
            continue
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                attention_torch(q, k, v, dropout_p, training=dropout_p > 0)
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def causal_pairs(Tq, Tk, B):
    """(query, key) pairs the mask leaves visible: query i sees Tk - Tq + i + 1 keys."""
    return B * (Tq * (Tk - Tq) + Tq * (Tq + 1) // 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Tk_index", [0, 1], ids=["no-memory", "memory"])
def test_attention(bench, Tk_index, mode, device):
    size = ATTENTION_SIZES[device.type]
    Tq, Tk, B, d = size["Tq"], size["Tk"][Tk_index], size["B"], size["d"]
    dtype = getattr(torch, size["dtype"])
    torch.manual_seed(0)
    q = torch.randn(Tq, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tq, B, d]
    k = torch.randn(Tk, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tk, B, d]
    v = torch.randn(Tk, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tk, B, d]
    dy = torch.randn(Tq, B, d, device=device, dtype=dtype)  # [Tq, B, d]
    training = mode == "forward+backward"
    dropout_p = DROPOUT if training else 0.0

    def step(backend):
        def run():
            if training:
                q.grad = k.grad = v.grad = None
                ops.attention(q, k, v, dropout_p=dropout_p, training=True, backend=backend).backward(dy)
            else:
                with torch.no_grad():
                    ops.attention(q, k, v, backend=backend)
        return run

    variants, skipped = {}, {}
    for backend in VARIANTS:
        if backend == "triton" and device.type != "cuda":
            skipped[backend] = "triton runs on CPU only in its interpreter, which is not a benchmark"
            continue
        info = None
        if backend == "torch":
            info = dict(sdpa_backend=sdpa_backend_used(q.detach(), k.detach(), v.detach(), dropout_p))
        variants[backend] = Variant(step(backend), info=info)

    pairs = causal_pairs(Tq, Tk, B)
    # Model FLOPs: Q K^T and P V forward; backward dV, dP, dQ, dK (recomputing P is not counted).
    flops = 2 * pairs * 2 * d if mode == "forward" else 2 * pairs * 6 * d
    # Least memory traffic: read q, k, v, write y; backward reads them again with y and dy, writes dq, dk, dv.
    moved = (2 * Tq + 2 * Tk) * B * d if mode == "forward" else (6 * Tq + 6 * Tk) * B * d
    bench.compare(f"attention {mode} Tk {Tk}", variants, baseline="torch", skipped=skipped,
                  size=dict(Tq=Tq, Tk=Tk, B=B, d=d, dtype=size["dtype"], dropout=dropout_p),
                  work=dict(tokens=Tq * B, flops=flops, bytes=moved * q.element_size()))
