"""LSTM through the persistent CUDA recurrence kernels of sharnn_fast._C (csrc/lstm/).

The input projection is one GEMM over all steps, done here with torch (its gradients too, by
autograd):  xg = x W_ih^T + b_ih + b_hh  [T, B, 4H].  The recurrence is two custom ops:

- ``sharnn_fast::lstm_cuda_fwd(xg, w_hh, h0, c0, save_for_backward)``: one cooperative launch runs
  all T steps. Block j keeps the 4 * hb rows of W_hh that produce the gates of its hb hidden units
  in shared memory, and each step reads h_{t-1} (written by every block) after a grid barrier.
  Returns y, h_n, c_n and, for the backward, the activated gates and the cell states (float32).
- ``sharnn_fast::lstm_cuda_bwd``: the reverse recurrence the same way, block j keeping the hb
  columns of W_hh (rows of W_hh^T) that its units' dh needs; returns dgates (= the gradient of xg),
  dh0 and dc0. dW_hh = sum_t dgates_t^T h_{t-1} is one GEMM afterwards.

How the hidden units are split over blocks is planned here (:func:`plan_recurrence`, pure, tested
on CPU with the properties of real GPUs). Both ops also have a CPU kernel that does the kernels'
arithmetic with torch ops, so that the autograd wiring, the GEMMs around the kernels and the fake
(meta) implementations are tested on machines without a GPU; the cuda backend itself only runs on
CUDA tensors.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ... import _native
from ...backend import Implementation
from .._kernels import KERNEL_DTYPES, compute_dtype, new_output

# Mirrors of the kernels' constants (csrc/lstm/lstm_recurrence.cuh); tests check that they agree.
THREADS = 512  # per block, one block per SM
WARPS = THREADS // 32
FMA_TILE = (4, 8)  # rows x sequences of one warp task on CUDA cores (float32)
MMA_TILE = (16, 8)  # rows x sequences of one warp task on tensor cores (float16, bfloat16)
STRIPE = 64  # rows of K elements are zero-padded to a multiple of this
ROW_PAD = 8  # and stored this many elements longer (spreads mma fragment reads over the banks)
PAIR_SLOTS = 2  # (hidden unit, sequence) cells per thread, kept in registers
MAX_REGISTERS_PER_THREAD = 128  # __launch_bounds__(THREADS, 1) on a 64K-register SM
RESERVED_SHARED_PER_BLOCK = 1024  # bytes of an SM's shared memory kept by the driver per block

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

@dataclass(frozen=True)
class DeviceLimits:
    """What the plan depends on; :func:`device_limits` reads it from the device."""

    name: str
    sm_count: int
    shared_per_block: int  # bytes, with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    shared_per_sm: int
    registers_per_sm: int
    cooperative_launch: bool


@dataclass(frozen=True)
class RecurrencePlan:
    """Launch shape of one recurrence kernel for one (H, B, dtype) on one device."""

    backward: bool
    blocks: int
    hidden_per_block: int  # hb: hidden units (all 4 gates) per block; the last block may have fewer
    chunk: int  # elements of the shared vector staged at a time (a multiple of STRIPE)
    k_splits: int  # ways each warp tile's dot products are split along K
    shared_bytes: int  # dynamic shared memory per block


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def shared_bytes(backward: bool, B: int, H: int, element_bytes: int, hidden_per_block: int,
                 chunk: int, k_splits: int) -> int:
    """Dynamic shared memory of one block, region by region as SharedLayout in the .cuh lays it out:
    W rows [rows, K padded + ROW_PAD], vector chunk [B, chunk + ROW_PAD], partial sums
    [k_splits, rows, B] float32."""
    rows = hidden_per_block if backward else 4 * hidden_per_block
    k_padded = _round_up(4 * H if backward else H, STRIPE)
    return (_round_up(rows * (k_padded + ROW_PAD) * element_bytes, 16)
            + _round_up(B * (chunk + ROW_PAD) * element_bytes, 16)
            + _round_up(k_splits * rows * B * 4, 16))


def plan_recurrence(backward: bool, H: int, B: int, dtype: torch.dtype,
                    limits: DeviceLimits) -> Union[RecurrencePlan, str]:
    """Split H hidden units over at most one block per SM; returns the plan, or a sentence saying
    which limit the shape exceeds.

    All blocks must be resident at once (the grid barrier waits for every block), and each block's
    slice of W_hh must stay in its shared memory for the whole sequence: 4 * hb * H elements for the
    forward, hb * 4H for the backward. The vector shared each step (h: B x H, dgates: B x 4H) is
    staged in chunks of whatever shared memory is left. Each thread keeps the cell state of at most
    PAIR_SLOTS (unit, sequence) pairs in registers.
    """
    direction = "backward" if backward else "forward"
    if not limits.cooperative_launch:
        return (f"{limits.name} does not support cooperative launches, which the {direction} "
                "kernel needs")
    if THREADS * MAX_REGISTERS_PER_THREAD > limits.registers_per_sm:
        return (f"the {direction} kernel needs {THREADS * MAX_REGISTERS_PER_THREAD} registers per "
                f"SM, {limits.name} has {limits.registers_per_sm}")
    element_bytes = torch.empty((), dtype=dtype).element_size()
    hidden_per_block = math.ceil(H / limits.sm_count)
    blocks = math.ceil(H / hidden_per_block)
    if hidden_per_block * B > THREADS * PAIR_SLOTS:
        return (f"the {direction} kernel updates at most {THREADS * PAIR_SLOTS} (hidden unit, "
                f"sequence) cells per block, but {hidden_per_block} of H={H} hidden units per "
                f"block on {limits.sm_count} SMs x B={B} sequences make {hidden_per_block * B}; "
                "use a smaller batch or another backend")
    rows = hidden_per_block if backward else 4 * hidden_per_block
    k_padded = _round_up(4 * H if backward else H, STRIPE)
    tile_rows, tile_batch = MMA_TILE if element_bytes == 2 else FMA_TILE
    tiles = math.ceil(rows / tile_rows) * math.ceil(B / tile_batch)
    # Idle warps take a share of K instead, but never more shares than there are stripes.
    k_splits = max(1, min(WARPS // tiles, k_padded // STRIPE))
    fixed = shared_bytes(backward, B, H, element_bytes, hidden_per_block, 0, k_splits)
    stripe_bytes = B * STRIPE * element_bytes  # a multiple of 16, so chunks add no padding
    allowed = min(limits.shared_per_block, limits.shared_per_sm - RESERVED_SHARED_PER_BLOCK)
    stripes = (allowed - fixed) // stripe_bytes
    if stripes < 1:
        matrix = "W_hh^T" if backward else "W_hh"
        vector = "dgates" if backward else "h"
        smaller_dtype = "" if element_bytes == 2 else ", a 2-byte dtype (bfloat16/float16)"
        return (f"the {direction} kernel keeps {rows} rows of {matrix} per block in shared memory "
                f"({hidden_per_block} of H={H} hidden units per block on {limits.sm_count} SMs, "
                f"{dtype}) and at least {STRIPE} columns of the B={B} sequences' {vector}: "
                f"{fixed + stripe_bytes} bytes per block, but {limits.name} allows {allowed}; use "
                f"a smaller hidden size or batch{smaller_dtype}, or another backend")
    chunk = min(k_padded, stripes * STRIPE)
    return RecurrencePlan(backward=backward, blocks=blocks, hidden_per_block=hidden_per_block,
                          chunk=chunk, k_splits=k_splits,
                          shared_bytes=shared_bytes(backward, B, H, element_bytes, hidden_per_block,
                                                    chunk, k_splits))


@functools.cache
def device_limits(index: int) -> DeviceLimits:
    """The limits of CUDA device ``index``, queried once through the extension."""
    ext = _native.require_cuda_kernels("the cuda LSTM")
    sms, per_block, per_sm, registers, cooperative = ext.lstm_recurrence_device_limits(index)
    return DeviceLimits(name=torch.cuda.get_device_name(index), sm_count=sms,
                        shared_per_block=per_block, shared_per_sm=per_sm,
                        registers_per_sm=registers, cooperative_launch=cooperative)


def _plan_for(backward: bool, xg: torch.Tensor, H: int) -> RecurrencePlan:
    plan = plan_recurrence(backward, H, xg.shape[1], xg.dtype, device_limits(xg.device.index))
    if isinstance(plan, str):
        raise ValueError(f"the cuda LSTM cannot run this shape: {plan}")
    return plan


def _check_kernel_arguments(op: str, same_dtype: dict, float32: dict, shapes: dict) -> None:
    """The kernels trust the pointers they get: check dtypes, devices and shapes before launching
    (the public op already did; this guards direct calls of the custom ops)."""
    tensors = {**same_dtype, **float32}
    dtypes = {t.dtype for t in same_dtype.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in KERNEL_DTYPES:
        raise ValueError(f"{op}: " + ", ".join(same_dtype) + " must share one dtype of float32, "
                         "float16 or bfloat16, got "
                         + ", ".join(f"{name} {t.dtype}" for name, t in same_dtype.items()))
    for name, t in float32.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32, got {t.dtype}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got "
                             f"{list(tensors[name].shape)}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"{op}: all tensors must be on one CUDA device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in tensors.items()))


# ---- forward recurrence -------------------------------------------------------------------------

@torch.library.custom_op("sharnn_fast::lstm_cuda_fwd", mutates_args=(), device_types="cuda")
def lstm_cuda_fwd(xg: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                  save_for_backward: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """xg [T, B, 4H], w_hh [4H, H], h0 and c0 [1, B, H], all one dtype.
    Returns y [T, B, H], h_n [1, B, H], c_n [1, B, H], and (empty unless save_for_backward) the
    activated gates [T, B, 4H] and cell states [T, B, H] in float32."""
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    _check_kernel_arguments("lstm_cuda_fwd", dict(xg=xg, w_hh=w_hh, h0=h0, c0=c0), {},
                            dict(xg=(T, B, 4 * H), w_hh=(4 * H, H), h0=(1, B, H), c0=(1, B, H)))
    xg, w_hh, h0, c0 = (t.contiguous() for t in (xg, w_hh, h0, c0))
    plan = _plan_for(False, xg, H)
    ext = _native.require_cuda_kernels("the cuda LSTM")
    y = new_output((T, B, H), xg.dtype, xg.device)  # [T, B, H]; also how h_{t-1} reaches every block
    c_n = new_output((1, B, H), xg.dtype, xg.device)  # [1, B, H]
    gates = new_output((T, B, 4 * H if save_for_backward else 0), torch.float32, xg.device)
    c_all = new_output((T, B, H if save_for_backward else 0), torch.float32, xg.device)
    with torch.cuda.device(xg.device):
        ext.lstm_recurrence_fwd(
            _DTYPE_NAMES[xg.dtype], xg.data_ptr(), w_hh.data_ptr(), h0.data_ptr(), c0.data_ptr(),
            y.data_ptr(), c_n.data_ptr(), gates.data_ptr() if save_for_backward else 0,
            c_all.data_ptr() if save_for_backward else 0, T, B, H, plan.hidden_per_block,
            plan.chunk, plan.k_splits, torch.cuda.current_stream(xg.device).cuda_stream)
    return y, y[-1:].clone(), c_n, gates, c_all


@lstm_cuda_fwd.register_kernel("cpu")
def _lstm_cuda_fwd_on_cpu(xg, w_hh, h0, c0, save_for_backward):
    """The forward kernel's arithmetic with torch ops: float32 gates and cell state, h rounded to
    the dtype after every step (it is what the next step reads)."""
    w = w_hh.float()
    h, c = h0[0], c0[0].float()  # [B, H]
    ys, gates, cells = [], [], []
    for t in range(xg.shape[0]):
        pre = xg[t].float() + h.float() @ w.t()  # [B, 4H]
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = (o * torch.tanh(c)).to(xg.dtype)
        ys.append(h)
        gates.append(torch.cat([i, f, g, o], dim=1))
        cells.append(c)
    y = torch.stack(ys)  # [T, B, H]
    T, B, H = y.shape
    if save_for_backward:
        gates, cells = torch.stack(gates), torch.stack(cells)  # [T, B, 4H], [T, B, H]
    else:
        gates = xg.new_empty(T, B, 0, dtype=torch.float32)
        cells = xg.new_empty(T, B, 0, dtype=torch.float32)
    return y, y[-1:].clone(), c.to(xg.dtype).unsqueeze(0), gates, cells


@lstm_cuda_fwd.register_fake
def _(xg, w_hh, h0, c0, save_for_backward):
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    saved = 1 if save_for_backward else 0
    return (xg.new_empty(T, B, H), xg.new_empty(1, B, H), xg.new_empty(1, B, H),
            xg.new_empty(T, B, 4 * H * saved, dtype=torch.float32),
            xg.new_empty(T, B, H * saved, dtype=torch.float32))


# ---- backward recurrence ------------------------------------------------------------------------

@torch.library.custom_op("sharnn_fast::lstm_cuda_bwd", mutates_args=(), device_types="cuda")
def lstm_cuda_bwd(w_hh: torch.Tensor, gates: torch.Tensor, c_all: torch.Tensor, c0: torch.Tensor,
                  dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the forward's saved gates [T, B, 4H] and cell states [T, B, H] (float32) and the
    gradients dy [T, B, H], dh_n, dc_n [1, B, H]: dgates [T, B, 4H] (the gradient of xg), dh0 and
    dc0 [1, B, H], in the dtype of w_hh."""
    T, B, H = c_all.shape
    _check_kernel_arguments(
        "lstm_cuda_bwd", dict(w_hh=w_hh, c0=c0, dy=dy, dh_n=dh_n, dc_n=dc_n),
        dict(gates=gates, c_all=c_all),
        dict(w_hh=(4 * H, H), gates=(T, B, 4 * H), c0=(1, B, H), dy=(T, B, H), dh_n=(1, B, H),
             dc_n=(1, B, H)))
    w_hh, gates, c_all, c0, dy, dh_n, dc_n = (
        t.contiguous() for t in (w_hh, gates, c_all, c0, dy, dh_n, dc_n))
    plan = _plan_for(True, dy, H)
    ext = _native.require_cuda_kernels("the cuda LSTM")
    # [T, B, 4H]; also how dgates_{t+1} reaches every block
    dgates = new_output((T, B, 4 * H), dy.dtype, dy.device)
    dh0 = new_output((1, B, H), dy.dtype, dy.device)
    dc0 = new_output((1, B, H), dy.dtype, dy.device)
    with torch.cuda.device(dy.device):
        ext.lstm_recurrence_bwd(
            _DTYPE_NAMES[dy.dtype], w_hh.data_ptr(), gates.data_ptr(), c_all.data_ptr(),
            c0.data_ptr(), dy.data_ptr(), dh_n.data_ptr(), dc_n.data_ptr(), dgates.data_ptr(),
            dh0.data_ptr(), dc0.data_ptr(), T, B, H, plan.hidden_per_block, plan.chunk,
            plan.k_splits, torch.cuda.current_stream(dy.device).cuda_stream)
    return dgates, dh0, dc0


@lstm_cuda_bwd.register_kernel("cpu")
def _lstm_cuda_bwd_on_cpu(w_hh, gates, c_all, c0, dy, dh_n, dc_n):
    """The backward kernel's arithmetic with torch ops: float32 dh and dc, dgates rounded to the
    dtype (it is what the previous step's dh is computed from)."""
    w = w_hh.float()
    dh_next, dc = dh_n[0].float(), dc_n[0].float()  # [B, H]
    dgates = []
    for t in reversed(range(dy.shape[0])):
        dh = dy[t].float() + dh_next
        i, f, g, o = gates[t].chunk(4, dim=1)
        c = c_all[t]
        c_prev = c_all[t - 1] if t > 0 else c0[0].float()
        tanh_c = torch.tanh(c)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dgate = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                           dh * tanh_c * o * (1 - o)], dim=1).to(dy.dtype)  # [B, 4H]
        dgates.append(dgate)
        dc = dc * f
        dh_next = dgate.float() @ w
    return (torch.stack(dgates[::-1]), dh_next.to(dy.dtype).unsqueeze(0),
            dc.to(dy.dtype).unsqueeze(0))


@lstm_cuda_bwd.register_fake
def _(w_hh, gates, c_all, c0, dy, dh_n, dc_n):
    T, B, H = c_all.shape
    return dy.new_empty(T, B, 4 * H), dy.new_empty(1, B, H), dy.new_empty(1, B, H)


def _setup_context(ctx, inputs, output):
    _, w_hh, h0, c0, save_for_backward = inputs
    y, _, _, gates, c_all = output
    ctx.saved = save_for_backward
    ctx.save_for_backward(w_hh, h0, c0, y, gates, c_all)


def _backward(ctx, dy, dh_n, dc_n, _dgates_saved, _dc_saved):
    if not ctx.saved:
        raise RuntimeError("sharnn_fast::lstm_cuda_fwd ran with save_for_backward=False, so it "
                           "kept nothing to differentiate with; call it with True under autograd")
    w_hh, h0, c0, y, gates, c_all = ctx.saved_tensors
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    dgates, dh0, dc0 = lstm_cuda_bwd(w_hh, gates, c_all, c0, dy, dh_n, dc_n)
    T, B, H = y.shape
    h_prev = torch.cat([h0, y[:-1]])  # [T, B, H]: the h each step's gates were computed from
    dw_hh = dgates.reshape(T * B, 4 * H).t() @ h_prev.reshape(T * B, H)  # [4H, H]
    return dgates, dw_hh, dh0, dc0, None


lstm_cuda_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- the backend --------------------------------------------------------------------------------

def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lstm_recurrence(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    """The cuda backend's computation on any device the custom ops have a kernel for (CUDA, and the
    CPU emulation used by tests). Same arguments and results as ``ops.lstm``."""
    dtype = compute_dtype(x)
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    x, weight_ih, weight_hh, bias_ih, bias_hh = (
        t.to(dtype) for t in (x, weight_ih, weight_hh, bias_ih, bias_hh))
    if hx is None:
        h0 = c0 = x.new_zeros(1, B, H)  # [1, B, H]
    else:
        h0, c0 = hx[0].to(dtype), hx[1].to(dtype)
    # One GEMM for every step's input projection; autograd gives dx, dW_ih and both biases.
    xg = F.linear(x, weight_ih, bias_ih + bias_hh)  # [T, B, 4H]
    save = _needs_grad(xg, weight_hh, h0, c0)
    y, h_n, c_n, _, _ = lstm_cuda_fwd(xg, weight_hh, h0, c0, save)
    return y, (h_n, c_n)  # [T, B, H], ([1, B, H], [1, B, H])


def why_not(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the cuda kernels run on CUDA tensors; got {x.device.type} tensors"
    h0, c0 = (None, None) if hx is None else hx
    needs_grad = _needs_grad(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    return _why_not_on_device(x.device.index, compute_dtype(x), weight_hh.shape[1], x.shape[1],
                              needs_grad)


# A constant for torch.compile: it queries the extension and the device (which dynamo cannot
# trace), and its answer depends only on its arguments, which are fixed for a compiled graph.
@torch.compiler.assume_constant_result
def _why_not_on_device(index: int, dtype: torch.dtype, H: int, B: int,
                       needs_grad: bool) -> Optional[str]:
    try:
        _native.require_cuda_kernels("the cuda LSTM")
    except RuntimeError as err:
        return str(err)
    if dtype not in KERNEL_DTYPES:
        return f"the cuda LSTM supports float32, float16 and bfloat16; got {dtype}"
    for backward in (False, True) if needs_grad else (False,):
        plan = plan_recurrence(backward, H, B, dtype, device_limits(index))
        if isinstance(plan, str):
            return plan
    return None


IMPLEMENTATION = Implementation(run=lstm_recurrence, why_not=why_not)
