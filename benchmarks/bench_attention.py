"""ops.attention per backend (the torch backend's two paths, SDPA and materialised scores; triton's
two paths, flash and materialised; reference),
forward and forward+backward, with and without a memory in front of the keys, for the paper's wide
head and a narrow one.

The forward runs as in evaluation (no dropout); forward+backward as in training, with the paper's
dropout of 0.1 on the attention weights. GPU: the paper's sizes (Tq 1024, Tk 1024 and 5000, one head
of d 1024, batch 16) in bfloat16, and the same with d 128. CPU: a small size in float32, without
triton (its interpreter is for tests, not timing). Each case reports time, TFLOP/s (model FLOPs: the
causal half only, no recomputation counted), % of the limit, peak memory (GPU), for the torch
variant which SDPA backend ran, and for the triton variants whether backend="triton" takes that
path at this width. Both triton paths run at both widths: "triton flash" is the flash kernel
(ops/attention/triton_flash.py), "triton wide" the materialised scores (ops/attention/triton_wide.py),
each forced with attention_triton(..., path=...). The backends are timed interleaved against "torch"
(conftest's ``bench``).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import Variant
from sharnn_fast import ops
from sharnn_fast.ops.attention.torch_native import attention_torch, torch_path

ATTENTION_SIZES = {
    "cuda": dict(Tq=1024, Tk=(1024, 5000), B=16, d=dict(wide=1024, narrow=128), dtype="bfloat16"),
    "cpu": dict(Tq=64, Tk=(64, 160), B=2, d=dict(wide=320, narrow=64), dtype="float32"),
}
# torch first: the baseline. "torch sdpa" and "torch materialised" are the torch backend with its path
# forced; the one that "torch" itself takes at that width and device is not run twice.
VARIANTS = ["torch", "torch sdpa", "torch materialised", "reference", "triton flash", "triton wide"]
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
                attention_torch(q, k, v, dropout_p, training=dropout_p > 0, path="sdpa")
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def causal_pairs(Tq, Tk, B):
    """(query, key) pairs the mask leaves visible: query i sees Tk - Tq + i + 1 keys."""
    return B * (Tq * (Tk - Tq) + Tq * (Tq + 1) // 2)


def torch_forced(path):
    """ops.attention's torch backend with its path forced ("sdpa" or "materialised")."""
    return lambda q, k, v, dropout_p, training: attention_torch(q, k, v, dropout_p, training, path=path)


def triton_path(path):
    """ops.attention's triton backend with its path forced ("flash" or "wide")."""
    from sharnn_fast.ops.attention.triton import attention_triton
    return lambda q, k, v, dropout_p, training: attention_triton(q, k, v, dropout_p, training, path=path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Tk_index", [0, 1], ids=["no-memory", "memory"])
@pytest.mark.parametrize("width", ["wide", "narrow"])
def test_attention(bench, width, Tk_index, mode, device):
    size = ATTENTION_SIZES[device.type]
    Tq, Tk, B, d = size["Tq"], size["Tk"][Tk_index], size["B"], size["d"][width]
    dtype = getattr(torch, size["dtype"])
    torch.manual_seed(0)
    q = torch.randn(Tq, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tq, B, d]
    k = torch.randn(Tk, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tk, B, d]
    v = torch.randn(Tk, B, d, device=device, dtype=dtype, requires_grad=True)  # [Tk, B, d]
    dy = torch.randn(Tq, B, d, device=device, dtype=dtype)  # [Tq, B, d]
    training = mode == "forward+backward"
    dropout_p = DROPOUT if training else 0.0

    def step(attention):
        def run():
            if training:
                q.grad = k.grad = v.grad = None
                attention(q, k, v, dropout_p, True).backward(dy)
            else:
                with torch.no_grad():
                    attention(q, k, v, 0.0, False)
        return run

    def backend(name):
        return lambda q, k, v, dropout_p, training: ops.attention(q, k, v, dropout_p=dropout_p, training=training,
                                                                  backend=name)

    variants, skipped = {}, {}
    for name in VARIANTS:
        if name.startswith("triton"):
            if device.type != "cuda":
                skipped[name] = "triton runs on CPU only in its interpreter, which is not a benchmark"
                continue
            from sharnn_fast.ops.attention.materialised import uses_materialised_scores
            path = name.split()[1]
            variants[name] = Variant(step(triton_path(path)), info=dict(
                backend_triton_takes_it=(path == "wide") == uses_materialised_scores(d)))
        elif name == "torch":
            path = torch_path(device, d, dtype)
            info = dict(path=path)
            if path == "sdpa":
                info["sdpa_backend"] = sdpa_backend_used(q.detach(), k.detach(), v.detach(), dropout_p)
            variants[name] = Variant(step(backend(name)), info=info)
        elif name.startswith("torch "):
            path = name.split()[1]
            if path == torch_path(device, d, dtype):
                skipped[name] = f"the same as torch at this width on {device.type}"
                continue
            info = dict(path=path)
            if path == "sdpa":
                info["sdpa_backend"] = sdpa_backend_used(q.detach(), k.detach(), v.detach(), dropout_p)
            variants[name] = Variant(step(torch_forced(path)), info=info)
        else:
            variants[name] = Variant(step(backend(name)))

    pairs = causal_pairs(Tq, Tk, B)
    # Model FLOPs: Q K^T and P V forward; backward dV, dP, dQ, dK (recomputing P is not counted).
    flops = 2 * pairs * 2 * d if mode == "forward" else 2 * pairs * 6 * d
    # Least memory traffic: read q, k, v, write y; backward reads them again with y and dy, writes dq, dk, dv.
    moved = (2 * Tq + 2 * Tk) * B * d if mode == "forward" else (6 * Tq + 6 * Tk) * B * d
    bench.compare(f"attention {mode} Tk {Tk} d {d}", variants, baseline="torch", skipped=skipped,
                  size=dict(Tq=Tq, Tk=Tk, B=B, d=d, dtype=size["dtype"], dropout=dropout_p),
                  work=dict(tokens=Tq * B, flops=flops, bytes=moved * q.element_size()))
