"""LSTM in Triton: one GEMM for the input projection of every step, then one fused kernel per step.

Forward, per call:
    xg = x W_ih^T + (b_ih + b_hh)                              # [T, B, 4H], one GEMM (torch, outside the op)
    for t: lstm_fwd_step_kernel                                # h_{t-1} W_hh^T for a tile of hidden units
                                                               # (all four gates), then c_t, h_t in registers
Backward, per call:
    for t = T-1 .. 0: lstm_bwd_step_kernel                     # dh_t = dy_t + dgates_{t+1} W_hh for a tile,
                                                               # then the gate gradients and dc_{t-1}
    dW_hh = sum_t dgates_t^T h_{t-1}                           # one GEMM after the loop
    dx, dW_ih, db                                              # autograd of the input projection: GEMMs
State and accumulation are float32 whatever the input dtype (float32, float16, bfloat16): c is kept
in float32, the gate activations saved for backward are float32, every dot accumulates in float32.
float32 inputs multiply as three tf32 products ("tf32x3", see ops/_precision.py): about float32
accuracy, never Triton's single-pass tf32 default.

The step loop runs in two torch.library custom ops (``sharnn_fast::lstm_triton_forward`` and
``..._backward``) with a fake implementation and an autograd formula, so torch.compile(fullgraph=True)
traces a model that uses them. They are custom ops rather than triton_ops on purpose: a triton_op
would let the compiler trace the T launches of the loop into its graph (a graph of 1024 kernels,
rebuilt for every new sequence length); as an opaque op the loop stays one node.

At T = 1024 the per-step kernels are short (microseconds) and the launches dominate, so on CUDA the
step loops replay CUDA graphs of GRAPH_CHUNK_STEPS steps at a time (see ``_forward_loop``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ... import _env
from ...backend import Implementation
from .._kernels import compute_dtype, interpreted, new_output, triton_why_not
from .._precision import triton_dot_precision


# ----------------------------------------------------------------------------------------------------
# Tuning constants (one place). On a GPU the step kernels are bound by reading W_hh (8 MiB in bf16 at
# H = 1024, L2-resident across steps), so the tiles are narrow to spread it over many SMs: at
# H = 1024 the forward runs 128 programs, the backward 64 (each backward program also reads the
# whole [B, 4H] dgates row, so narrower backward tiles trade parallelism for L2 traffic). Per
# kernel ("fwd", "bwd"): BLOCK_B batch rows per program (>= 16, tl.dot's M, so B = 16 is one
# unpadded tile), BLOCK_H hidden units per program (the forward's tile covers 4 * BLOCK_H rows of
# W_hh: all four gates) and BLOCK_K the reduction chunk (over H forward, over 4H backward). tl.dot
# needs K >= 16 and pads M, N below 16; the forward's N is 4 * BLOCK_H, the backward's BLOCK_H.
# float32 (tf32x3 dots: each operand split in two) takes at most 16 sequences per program: at 32,
# tools/compile_report.py shows the forward spilling 0.9 KB (sm_90a) to 4 KB (sm_80) of stack.
# Unmeasured on a GPU so far: benchmarks/bench_lstm.py is where to tune them.
# ----------------------------------------------------------------------------------------------------
GPU_CONFIG = dict(fwd=dict(BLOCK_H=8, BLOCK_K=128, num_warps=4),
                  bwd=dict(BLOCK_H=16, BLOCK_K=128, num_warps=4))
GPU_MAX_BLOCK_B = {torch.float32: 16, torch.float16: 64, torch.bfloat16: 64}
# CUDA graphs replace the launches (~10 us of host time per step against kernels of a few us) in
# windows of this many steps; a window holds K steps of every buffer (about 40 MiB at the
# paper's size), one per (direction, B, H, dtype).
GRAPH_CHUNK_STEPS = 32
# "auto" (default): windows with CUDA graphs on CUDA; "0": plain launches; "1": windows everywhere
# (on CPU without a graph: the tests use it to check the windowing in the interpreter).
GRAPHS_ENV = "SHARNN_TRITON_LSTM_GRAPHS"


def launch_config(kernel: str, B: int, H: int, dtype: torch.dtype, interpreter: bool) -> dict:
    """Block sizes and launch options of ``kernel`` ("fwd" or "bwd", the step kernels) for batch B,
    width H and inputs of ``dtype``, on a GPU or (``interpreter``) in Triton's interpreter. The
    launchers take them from here only, so tools/compile_report.py, which runs the launchers on meta
    tensors, compiles what runs. The interpreter runs programs one after another with numpy, so
    there each step is one program covering the whole [B, H] state."""
    batch = max(16, triton.next_power_of_2(B))
    if interpreter:
        width = max(16, triton.next_power_of_2(H))
        return dict(BLOCK_B=batch, BLOCK_H=width, BLOCK_K=width if kernel == "fwd" else 4 * width,
                    num_warps=4)
    return dict(GPU_CONFIG[kernel], BLOCK_B=min(batch, GPU_MAX_BLOCK_B[dtype]))


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
# Only Triton builtins and our own jit functions inside kernels: the interpreter cannot run
# triton.language's jit-defined helpers (tl.zeros, tl.sigmoid, ...) when triton was imported before
# TRITON_INTERPRET=1 was set, which is what importing sharnn_fast under pytest does.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # Through the sigmoid: tl has no tanh on every Triton version.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=["t"])
def lstm_fwd_step_kernel(
    xg_ptr,     # [T, B, 4H] input dtype: x_t W_ih^T + b_ih + b_hh
    w_hh_ptr,   # [4H, H] input dtype
    hs_ptr,     # [T + 1, B, H] input dtype: h_0 .. h_T; reads row t, writes row t + 1
    c_ptr,      # [T + 1, B, H] fp32: c_0 .. c_T; reads row t, writes row t + 1
    gates_ptr,  # [T, B, 4H] fp32: writes the activated gates i, f, g, o of step t
    t, B, H,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step t for BLOCK_H hidden units and BLOCK_B sequences."""
    batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    batch_ok = batch < B
    # The 4 * BLOCK_H rows of W_hh this tile needs, unit-major: row r is gate r % 4 of unit r // 4,
    # so one dot computes all four gates and a reshape splits them.
    rows = tl.arange(0, 4 * BLOCK_H)
    row_unit = tl.program_id(0) * BLOCK_H + rows // 4
    w_rows = (rows % 4) * H + row_unit  # [4BH]
    t = t.to(tl.int64)  # offsets of whole steps can pass 2^31 elements

    h_prev = hs_ptr + t * B * H
    acc = tl.full((BLOCK_B, 4 * BLOCK_H), 0.0, tl.float32)  # h_{t-1} W_hh^T for the tile
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_prev + batch[:, None] * H + k[None, :],
                    mask=batch_ok[:, None] & (k[None, :] < H), other=0.0)  # [BB, BK]
        w = tl.load(w_hh_ptr + w_rows[:, None] * H + k[None, :],
                    mask=(row_unit[:, None] < H) & (k[None, :] < H), other=0.0)  # [4BH, BK]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    # [BB, 4BH] -> [BB, BH, 2, 2] (unit, gate // 2, gate % 2); split the last axis, then the next.
    even, odd = tl.split(acc.reshape(BLOCK_B, BLOCK_H, 2, 2))
    pre_i, pre_g = tl.split(even)
    pre_f, pre_o = tl.split(odd)

    ok = batch_ok[:, None] & (units[None, :] < H)
    gate = batch[:, None] * (4 * H) + units[None, :]  # [BB, BH]: gate i of (b, u) within a step
    xg = xg_ptr + t * B * 4 * H
    i = _sigmoid(pre_i + tl.load(xg + gate, mask=ok, other=0.0).to(tl.float32))
    f = _sigmoid(pre_f + tl.load(xg + gate + H, mask=ok, other=0.0).to(tl.float32))
    g = _tanh(pre_g + tl.load(xg + gate + 2 * H, mask=ok, other=0.0).to(tl.float32))
    o = _sigmoid(pre_o + tl.load(xg + gate + 3 * H, mask=ok, other=0.0).to(tl.float32))

    state = batch[:, None] * H + units[None, :]  # [BB, BH]
    c_prev = tl.load(c_ptr + t * B * H + state, mask=ok, other=0.0)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    tl.store(c_ptr + (t + 1) * B * H + state, c, mask=ok)
    tl.store(hs_ptr + (t + 1) * B * H + state, h.to(hs_ptr.dtype.element_ty), mask=ok)
    gates = gates_ptr + t * B * 4 * H
    tl.store(gates + gate, i, mask=ok)
    tl.store(gates + gate + H, f, mask=ok)
    tl.store(gates + gate + 2 * H, g, mask=ok)
    tl.store(gates + gate + 3 * H, o, mask=ok)


@triton.jit(do_not_specialize=["t"])
def lstm_bwd_step_kernel(
    d_hs_ptr,      # [T + 1, B, H] input dtype: gradient reaching h_0 .. h_T from outside (dy, dh_n)
    d_c_ptr,       # [T + 1, B, H] fp32: gradient reaching c_0 .. c_T from outside (if HAS_D_C)
    w_hh_t_ptr,    # [H, 4H] input dtype: W_hh transposed, so each program reads whole rows
    c_ptr,         # [T + 1, B, H] fp32: c_0 .. c_T
    gates_ptr,     # [T, B, 4H] fp32: activated gates i, f, g, o
    dgates_ptr,    # [T, B, 4H] input dtype: reads step t + 1, writes step t (pre-activation grads)
    dc_carry_ptr,  # [B, H] fp32: dL/dc_t from the later steps on entry, dL/dc_{t-1} on exit
    t, T, B, H,
    HAS_D_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of step t for BLOCK_H hidden units and BLOCK_B sequences."""
    batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    batch_ok = batch < B
    units_ok = units < H
    ok = batch_ok[:, None] & units_ok[None, :]
    state = batch[:, None] * H + units[None, :]  # [BB, BH]
    has_next = t + 1 < T
    t = t.to(tl.int64)

    dh = tl.load(d_hs_ptr + (t + 1) * B * H + state, mask=ok, other=0.0).to(tl.float32)
    if has_next:  # dL/dh_t through step t + 1: dgates_{t+1} [B, 4H] @ W_hh[:, units]
        dgates_next = dgates_ptr + (t + 1) * B * 4 * H
        for k0 in range(0, 4 * H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            dg = tl.load(dgates_next + batch[:, None] * (4 * H) + k[None, :],
                         mask=batch_ok[:, None] & (k[None, :] < 4 * H), other=0.0)  # [BB, BK]
            w = tl.load(w_hh_t_ptr + units[:, None] * (4 * H) + k[None, :],
                        mask=units_ok[:, None] & (k[None, :] < 4 * H), other=0.0)  # [BH, BK]
            dh = tl.dot(dg, tl.trans(w), dh, input_precision=DOT_PRECISION)

    dc = tl.load(dc_carry_ptr + state, mask=ok, other=0.0)
    if HAS_D_C:
        dc += tl.load(d_c_ptr + (t + 1) * B * H + state, mask=ok, other=0.0)
    gate = batch[:, None] * (4 * H) + units[None, :]  # [BB, BH]
    gates = gates_ptr + t * B * 4 * H
    i = tl.load(gates + gate, mask=ok, other=0.0)
    f = tl.load(gates + gate + H, mask=ok, other=0.0)
    g = tl.load(gates + gate + 2 * H, mask=ok, other=0.0)
    o = tl.load(gates + gate + 3 * H, mask=ok, other=0.0)
    c = tl.load(c_ptr + (t + 1) * B * H + state, mask=ok, other=0.0)
    c_prev = tl.load(c_ptr + t * B * H + state, mask=ok, other=0.0)

    tanh_c = _tanh(c)
    dc += dh * o * (1.0 - tanh_c * tanh_c)
    out_dtype = dgates_ptr.dtype.element_ty
    dgates = dgates_ptr + t * B * 4 * H
    tl.store(dgates + gate, (dc * g * i * (1.0 - i)).to(out_dtype), mask=ok)
    tl.store(dgates + gate + H, (dc * c_prev * f * (1.0 - f)).to(out_dtype), mask=ok)
    tl.store(dgates + gate + 2 * H, (dc * i * (1.0 - g * g)).to(out_dtype), mask=ok)
    tl.store(dgates + gate + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(out_dtype), mask=ok)
    tl.store(dc_carry_ptr + state, dc * f, mask=ok)


# ----------------------------------------------------------------------------------------------------
# Step loops. Per step the host does one launch. On CUDA, runs of GRAPH_CHUNK_STEPS steps are
# replayed from a CUDA graph instead: the graph works on a window of static buffers (K steps of
# every tensor), so one graph serves every sequence length; per window the host copies the inputs
# in and the results out (a handful of copies instead of K launches), and the last T mod K steps
# are launched directly.
# ----------------------------------------------------------------------------------------------------
def _forward_launches(xg, w_hh, hs, c_all, gates, steps: range):
    """Steps ``steps`` of the forward: xg [T, B, 4H], w_hh [4H, H]; reads hs and c_all at t, writes
    them at t + 1 and gates at t."""
    _, B, _ = xg.shape
    H = w_hh.shape[1]
    config = launch_config("fwd", B, H, xg.dtype, interpreted(lstm_fwd_step_kernel))
    launch = lstm_fwd_step_kernel[(triton.cdiv(H, config["BLOCK_H"]), triton.cdiv(B, config["BLOCK_B"]))]
    for t in steps:
        launch(xg, w_hh, hs, c_all, gates, t, B, H, DOT_PRECISION=triton_dot_precision(xg.dtype), **config)


def _backward_launches(d_hs, d_c_all, w_hh_t, c_all, gates, dgates, dc_carry, steps: range, T: int):
    """Steps ``steps`` (descending) of the backward of a T-step forward: reads dgates at t + 1 when
    t + 1 < T, writes dgates at t and updates dc_carry [B, H]."""
    _, B, _ = gates.shape
    H = w_hh_t.shape[0]
    config = launch_config("bwd", B, H, dgates.dtype, interpreted(lstm_bwd_step_kernel))
    launch = lstm_bwd_step_kernel[(triton.cdiv(H, config["BLOCK_H"]), triton.cdiv(B, config["BLOCK_B"]))]
    # Without an outside gradient for c, any fp32 tensor stands in for the pointer it never reads.
    d_c = dc_carry if d_c_all is None else d_c_all
    for t in steps:
        launch(d_hs, d_c, w_hh_t, c_all, gates, dgates, dc_carry, t, T, B, H,
               HAS_D_C=d_c_all is not None, DOT_PRECISION=triton_dot_precision(dgates.dtype), **config)


class _StepWindow:
    """Static buffers for K steps and the K launches on them: captured in a CUDA graph on CUDA,
    run directly elsewhere (the interpreter, where the tests check the windowing)."""

    def __init__(self, device: torch.device, buffers: dict, launches: Callable):
        self.__dict__.update(buffers)
        self._launches = launches
        self._graph = None
        if device.type == "cuda":
            launches()  # compiles and loads the kernels for these arguments outside the capture
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: the backward window is captured in autograd's worker thread.
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                launches()

    def replay(self) -> None:
        if self._graph is None:
            self._launches()
        else:
            self._graph.replay()


_windows: dict = {}  # (direction, device, B, H, dtype, K, ...) -> _StepWindow


def _forward_window(B, H, dtype, device, K) -> _StepWindow:
    key = ("forward", str(device), B, H, dtype, K)
    if key not in _windows:
        def zeros(*shape, dtype=dtype):
            return torch.zeros(shape, dtype=dtype, device=device)
        w = dict(xg=zeros(K, B, 4 * H), w_hh=zeros(4 * H, H), hs=zeros(K + 1, B, H),
                 c=zeros(K + 1, B, H, dtype=torch.float32), gates=zeros(K, B, 4 * H, dtype=torch.float32))
        _windows[key] = _StepWindow(device, w, lambda: _forward_launches(
            w["xg"], w["w_hh"], w["hs"], w["c"], w["gates"], range(K)))
    return _windows[key]


def _backward_window(B, H, dtype, device, K, has_d_c) -> _StepWindow:
    key = ("backward", str(device), B, H, dtype, K, has_d_c)
    if key not in _windows:
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)
        # Global rows t0 .. t0 + K of d_hs, d_c and c, t0 .. t0 + K - 1 of gates, and of dgates
        # also row t0 + K (dgates of the step after the window: an input; zeros after the last).
        w = dict(d_hs=zeros(K + 1, B, H, dtype=dtype), d_c=zeros(K + 1, B, H) if has_d_c else None,
                 w_hh_t=zeros(H, 4 * H, dtype=dtype), c=zeros(K + 1, B, H), gates=zeros(K, B, 4 * H),
                 dgates=zeros(K + 1, B, 4 * H, dtype=dtype), dc=zeros(B, H))
        _windows[key] = _StepWindow(device, w, lambda: _backward_launches(
            w["d_hs"], w["d_c"], w["w_hh_t"], w["c"], w["gates"], w["dgates"], w["dc"],
            reversed(range(K)), K + 1))
    return _windows[key]


def _windowed_steps(device: torch.device, T: int) -> int:
    """How many of the T steps run in windows (a multiple of GRAPH_CHUNK_STEPS)."""
    setting = _env.choice(GRAPHS_ENV)  # ValueError for another value than auto, 0 or 1
    if setting == "0" or (setting == "auto" and device.type != "cuda"):
        return 0
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return 0  # inside someone else's capture the launches simply join their graph
    return T // GRAPH_CHUNK_STEPS * GRAPH_CHUNK_STEPS


def _forward_loop(xg, w_hh, h0, c0, hs, c_all, gates):
    """xg [T, B, 4H], w_hh [4H, H], h0 and c0 [B, H] -> fills hs, c_all (rows 0 .. T), gates."""
    T, B, H4 = xg.shape
    hs[0].copy_(h0)
    c_all[0].copy_(c0)
    K = GRAPH_CHUNK_STEPS
    windowed = _windowed_steps(xg.device, T)
    if windowed:
        win = _forward_window(B, H4 // 4, xg.dtype, xg.device, K)
        win.w_hh.copy_(w_hh)
        for t0 in range(0, windowed, K):
            win.xg.copy_(xg[t0:t0 + K])
            win.hs[0].copy_(hs[t0])
            win.c[0].copy_(c_all[t0])
            win.replay()
            hs[t0 + 1:t0 + K + 1].copy_(win.hs[1:])
            c_all[t0 + 1:t0 + K + 1].copy_(win.c[1:])
            gates[t0:t0 + K].copy_(win.gates)
    _forward_launches(xg, w_hh, hs, c_all, gates, range(windowed, T))


def _backward_loop(d_hs, d_c_all, w_hh_t, c_all, gates, dgates, dc_carry):
    """Gradients d_hs [T+1, B, H] and d_c_all [T+1, B, H] (or None) of the forward's hs and c_all
    -> fills dgates [T, B, 4H] and dc_carry [B, H] (dL/dc_0 less the outside gradient of c_0)."""
    T, B, H4 = gates.shape
    dc_carry.zero_()
    K = GRAPH_CHUNK_STEPS
    windowed = _windowed_steps(gates.device, T)
    if windowed:  # the windows cover the last `windowed` steps, which the backward meets first
        win = _backward_window(B, H4 // 4, dgates.dtype, gates.device, K, d_c_all is not None)
        win.w_hh_t.copy_(w_hh_t)
        win.dc.zero_()
        for t0 in range(T - K, T - windowed - 1, -K):
            win.d_hs.copy_(d_hs[t0:t0 + K + 1])
            if d_c_all is not None:
                win.d_c.copy_(d_c_all[t0:t0 + K + 1])
            win.c.copy_(c_all[t0:t0 + K + 1])
            win.gates.copy_(gates[t0:t0 + K])
            if t0 + K < T:
                win.dgates[K].copy_(dgates[t0 + K])
            else:
                win.dgates[K].zero_()
            win.replay()
            dgates[t0:t0 + K].copy_(win.dgates[:K])
        dc_carry.copy_(win.dc)
    _backward_launches(d_hs, d_c_all, w_hh_t, c_all, gates, dgates, dc_carry,
                       reversed(range(T - windowed)), T)


def _current_device(device: torch.device):
    """Triton launches (and CUDA graphs capture) on the current CUDA device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("sharnn_fast::lstm_triton_forward", mutates_args=())
def lstm_triton_forward(xg: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """xg [T, B, 4H] (input projection with both biases), weight_hh [4H, H], h0 and c0 [B, H] ->
    hs [T+1, B, H] (h0, then h_1 .. h_T), c_all [T+1, B, H] fp32, gates [T, B, 4H] fp32 (activated)."""
    T, B, H4 = xg.shape
    H = H4 // 4
    hs = new_output((T + 1, B, H), xg.dtype, xg.device)
    c_all = new_output((T + 1, B, H), torch.float32, xg.device)
    gates = new_output((T, B, H4), torch.float32, xg.device)
    with _current_device(xg.device):
        _forward_loop(xg.contiguous(), weight_hh.contiguous(), h0, c0, hs, c_all, gates)
    return hs, c_all, gates


@lstm_triton_forward.register_fake
def _(xg, weight_hh, h0, c0):
    T, B, H4 = xg.shape
    return (xg.new_empty(T + 1, B, H4 // 4), xg.new_empty(T + 1, B, H4 // 4, dtype=torch.float32),
            xg.new_empty(T, B, H4, dtype=torch.float32))


@torch.library.custom_op("sharnn_fast::lstm_triton_backward", mutates_args=())
def lstm_triton_backward(d_hs: Tensor, d_c_all: Optional[Tensor], weight_hh: Tensor, hs: Tensor,
                         c_all: Tensor, gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of lstm_triton_forward's hs and c_all -> d_xg [T, B, 4H], d_weight_hh [4H, H],
    dh0 [B, H], dc0 [B, H], all in the input dtype."""
    T, B, H4 = gates.shape
    dtype = hs.dtype
    dgates = new_output((T, B, H4), dtype, hs.device)  # = d_xg
    dc_carry = torch.empty(B, H4 // 4, dtype=torch.float32, device=hs.device)
    d_hs = d_hs.contiguous()
    d_c_all = None if d_c_all is None else d_c_all.contiguous()
    with _current_device(hs.device):
        _backward_loop(d_hs, d_c_all, weight_hh.t().contiguous(), c_all, gates, dgates, dc_carry)
    # The parts no step needs, as GEMMs over all steps at once.
    d_weight_hh = dgates.view(T * B, H4).t() @ hs[:-1].reshape(T * B, H4 // 4)  # sum_t dgates_t^T h_{t-1}
    dh0 = torch.addmm(d_hs[0], dgates[0], weight_hh)
    dc0 = dc_carry if d_c_all is None else dc_carry + d_c_all[0]
    return dgates, d_weight_hh, dh0, dc0.to(dtype)


@lstm_triton_backward.register_fake
def _(d_hs, d_c_all, weight_hh, hs, c_all, gates):
    T, B, H4 = gates.shape
    return (hs.new_empty(T, B, H4), torch.empty_like(weight_hh), hs.new_empty(B, H4 // 4),
            hs.new_empty(B, H4 // 4))


def _setup_context(ctx, inputs, output):
    _, weight_hh, _, _ = inputs
    hs, c_all, gates = output
    ctx.save_for_backward(weight_hh, hs, c_all, gates)
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)  # c_n is rarely used: no [T+1, B, H] of zeros for its gradient


def _backward(ctx, d_hs, d_c_all, _d_gates):
    weight_hh, hs, c_all, gates = ctx.saved_tensors
    if d_hs is None:  # only c_n reached the loss
        d_hs = torch.zeros_like(hs)
    return torch.ops.sharnn_fast.lstm_triton_backward(d_hs, d_c_all, weight_hh, hs, c_all, gates)


lstm_triton_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------
def lstm_triton(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    T, B, _ = x.shape
    dtype = compute_dtype(x)  # under autocast, its dtype, as torch.lstm runs
    # Casting here (not with register_autocast, which fixes one dtype) serves fp16 and bf16
    # autocast alike; autograd casts the gradients back to the parameters' dtype.
    x, weight_ih, weight_hh, bias_ih, bias_hh = (
        t.to(dtype) for t in (x, weight_ih, weight_hh, bias_ih, bias_hh))
    if hx is None:
        h0 = c0 = x.new_zeros(B, weight_hh.shape[1])  # [B, H]
    else:
        h0, c0 = hx[0][0].to(dtype), hx[1][0].to(dtype)  # [B, H]
    xg = F.linear(x, weight_ih, bias_ih + bias_hh)  # [T, B, 4H]: every step's input projection at once
    hs, c_all, _ = torch.ops.sharnn_fast.lstm_triton_forward(xg, weight_hh, h0, c0)
    return hs[1:], (hs[T:], c_all[T:].to(dtype))  # [T, B, H], ([1, B, H], [1, B, H])


def why_not(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None) -> Optional[str]:
    return triton_why_not("LSTM", x, lstm_fwd_step_kernel)


IMPLEMENTATION = Implementation(run=lstm_triton, why_not=why_not)
