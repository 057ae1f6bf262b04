"""LSTM through PyTorch's own fused kernel: the one nn.LSTM calls (cuDNN on CUDA, oneDNN or ATen's
own loop on CPU).

The inputs are cast to the compute dtype here and torch.lstm runs with autocast off, so every
tensor it sees has one dtype: under CPU autocast, torch.lstm would otherwise receive a mix, which
oneDNN rejects on many CPUs. Whether this CPU's torch.lstm runs a reduced-precision dtype at all is
probed once per dtype (:func:`cpu_lstm_failure`), so "auto" can fall back instead of crashing.

Under torch.compile the layer is one opaque custom op, ``sharnn_fast::lstm_torch_fwd`` with
``sharnn_fast::lstm_torch_bwd`` as its backward (register_fake and register_autograd), so the graph
keeps symbolic T and B: traced as ``torch.lstm``, PyTorch's decomposition unrolls the recurrence
into T steps and specialises the graph to the segment length. Inside the ops:

- **oneDNN** (CPU, float32, oneDNN on: what ``torch.lstm`` itself runs there): the forward and
  backward are ATen's ``mkldnn_rnn_layer`` and ``mkldnn_rnn_layer_backward``, the two kernels eager
  autograd calls, so compiled and eager steps compute the same values. oneDNN's backward needs
  the forward's workspace, a buffer whose size oneDNN decides, which a traced graph cannot carry
  without a graph break: it waits in a table until the backward (:class:`_Workspaces`).
- **Elsewhere** (CUDA, float64, float16/bfloat16): the forward is ``torch.lstm`` (cuDNN on CUDA)
  without an autograd graph, and the backward is backpropagation through time written here
  (:func:`_bptt`): the gates recomputed from x and y with two large GEMMs, then one small GEMM per
  step for the recurrent gradient. Not as fast as cuDNN's backward, and not yet measured on a GPU.

Eager calls keep calling ``torch.lstm`` directly (no custom-op dispatch, and double backward where
ATen's CPU LSTM has it), except a **bfloat16 LSTM on CUDA at the sizes where cuDNN has its
persistent algorithm** for float16 and not for bfloat16
(:func:`~sharnn_fast.backend.lstm_bfloat16_via_float16`). There cuDNN's bfloat16 LSTM takes its
standard, step-by-step algorithm, about four times slower at the paper's size (36.8 ms against
8.8 ms a layer, forward and backward, H200, 2026-12-04). So there the layer runs in float16
(:class:`_Float16ForBfloat16`), the route nn.LSTM takes under bfloat16 autocast (PyTorch's autocast
casts every cuDNN RNN to float16), with what that route lacks added:

- the casts are exact in float16's normal range (2**-14 to 65504): a bfloat16 value has 8
  significant bits and float16 holds 11; smaller inputs lose bits (an absolute error below 2**-25
  each); cuDNN computes in float32; the outputs are rounded to bfloat16 at the end;
- the backward scales the incoming gradients by the power of two that brings their largest finite
  magnitude to [1, 2) before casting them to float16, and divides the results by it in float32.
  The backward is linear in those gradients, so this moves float16's range to where the gradients
  are: gradients far below float16's own range (a loss averaged over 16K tokens gives them) keep
  their precision instead of flushing to zero. The range is relative to the largest gradient of
  the call: an element 2**14 times smaller loses bits, about 2**25 times smaller is zero, where bfloat16
  would keep it. Errors are therefore float16's relative to each tensor's largest element (what
  the tests measure), not element by element;
- where float16's range is still exceeded (an input above 65504, a gradient that grows more than
  2**15 times through the layer: weight gradients sum over all T x B positions), the lost values
  are caught and that call runs in bfloat16 instead, with a warning; the counts are in
  ``FLOAT16_FALLBACKS``. A batch column is checked on its own (the columns of an LSTM are
  independent), so a NaN in one column propagates as in bfloat16 without hiding an overflow in
  another.

The price is a few passes over the [T, B, H] tensors (casts and finiteness checks) and one device
synchronisation per forward and one per backward. Not used under CUDA graph capture (the checks
synchronise) or torch.compile (the custom op above runs bfloat16). None of this has run on a GPU
yet: the tests run ATen's CPU float16 LSTM in its place.
"""
from __future__ import annotations

import collections
import functools
import warnings
import weakref
from typing import Optional

import torch

from ...backend import lstm_bfloat16_via_float16, note_path
from .._dtypes import compute_dtype, math_dtype, no_autocast

_NOT_FLAT_WARNING = "RNN module weights are not part of single contiguous chunk of memory"
_PROBED_DTYPES = (torch.float16, torch.bfloat16)


def _torch_lstm(x, weights, hx, needs_grad: bool):
    # `train` only decides whether cuDNN keeps what its backward needs (this LSTM has no dropout),
    # so ask for it exactly when a backward can follow: nn.LSTM ties it to module.training instead,
    # which breaks backward in eval mode.
    args = (x, tuple(hx), tuple(weights), True, 1, 0.0, needs_grad, False, False)
    with no_autocast(x.device):
        if x.is_cuda and not torch.compiler.is_compiling():
            # cuDNN wants the four weights in one flat buffer (nn.LSTM's flatten_parameters); ours
            # are separate Parameters, so it copies them (a few microseconds a call) and warns.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_FLAT_WARNING)
                return torch.lstm(*args)
        return torch.lstm(*args)


def lstm_torch(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    _, B, _ = x.shape
    H = weight_hh.shape[1]
    dtype = compute_dtype(x)
    x, *weights = (t.to(dtype) for t in (x, weight_ih, weight_hh, bias_ih, bias_hh))
    if hx is None:
        zeros = x.new_zeros(1, B, H)  # [1, B, H]
        hx = (zeros, zeros)
    hx = tuple(t.to(dtype) for t in hx)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *hx))
    if torch.compiler.is_compiling():
        y, h_n, c_n = lstm_torch_fwd(x, *weights, *hx, needs_grad)
        return y, (h_n, c_n)
    via_float16 = lstm_bfloat16_via_float16(x, weights[1], x.dtype)
    note_path("lstm", lambda: _describe(x.dtype, via_float16))
    if not via_float16:
        y, h_n, c_n = _torch_lstm(x, weights, hx, needs_grad)
    elif needs_grad:
        y, h_n, c_n = _Float16ForBfloat16.apply(x, *weights, *hx)
    else:
        y, h_n, c_n = _float16_inference(x, weights, hx)
    return y, (h_n, c_n)  # [T, B, H], ([1, B, H], [1, B, H])


def _describe(dtype: torch.dtype, via_float16: bool) -> str:
    if via_float16:
        return ("cuDNN's float16 LSTM for bfloat16 inputs (its persistent algorithm at these sizes; "
                "exact casts, gradients scaled per call)")
    return f"torch.lstm in {str(dtype).removeprefix('torch.')}"


# ------------------------------------------------------------------------------------------------
# bfloat16 through cuDNN's float16 LSTM (see the module docstring)
# ------------------------------------------------------------------------------------------------

FLOAT16_FALLBACKS = collections.Counter()  # "forward" / "backward": calls that ran bfloat16 instead


def _finite_columns(tensors) -> torch.Tensor:
    """[B] booleans on the device: batch column b of every tensor ([T or 1, B, features]) is finite.
    Columns of an LSTM are independent: column b of y, h_n, c_n depends on column b of x, h0, c0
    (and the weights) only, and so do those columns of their gradients."""
    return torch.stack([torch.isfinite(t).all(dim=-1).all(dim=0) for t in tensors]).all(dim=0)


def _all_finite(tensors) -> torch.Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _fell_back(where: str) -> None:
    FLOAT16_FALLBACKS[where] += 1
    note_path("lstm", lambda: f"torch.lstm in bfloat16 (the float16 route's {where} exceeded float16's range)")
    warnings.warn(f"sharnn_fast: the bfloat16 LSTM's {where} exceeds float16's range; this call ran "
                  "cuDNN's bfloat16 LSTM instead (slower)",
                  RuntimeWarning, stacklevel=3)


def _forward_check(inputs, inputs16, outputs16) -> tuple[bool, torch.Tensor]:
    """Whether float16 lost what bfloat16 holds, with one synchronisation, and the [B] columns whose
    inputs (and the weights) are all finite. Lost: an input element finite in bfloat16 and not in
    float16 (beyond 65504; a gate could saturate on it and return a finite, wrong value), or a
    non-finite output in a column whose inputs are all finite (a NaN elsewhere in the batch does not
    hide it)."""
    x, *weights, h0, c0 = inputs
    columns = _finite_columns([x, h0, c0]) & _all_finite(weights)
    lost_input = torch.stack([(torch.isfinite(t) & ~torch.isfinite(t16)).any() for t, t16 in zip(inputs, inputs16)])
    lost_output = (columns & ~_finite_columns(outputs16)).any()
    return bool(lost_input.any() | lost_output), columns


def _float16_inference(x, weights, hx):
    inputs, inputs16 = (x, *weights, *hx), [t.to(torch.float16) for t in (x, *weights, *hx)]
    outputs = _torch_lstm(inputs16[0], inputs16[1:5], inputs16[5:], needs_grad=False)
    if _forward_check(inputs, inputs16, outputs)[0]:
        _fell_back("forward")
        return _torch_lstm(x, weights, hx, needs_grad=False)
    return tuple(t.to(torch.bfloat16) for t in outputs)


def _gradient_scale(grads) -> torch.Tensor:
    """The power of two (float32, on the device, no synchronisation) that brings the largest finite
    magnitude among ``grads`` to [1, 2); 1 where they have no finite non-zero element."""
    largest = torch.stack([torch.where(torch.isfinite(g), g.abs(), 0).amax().float() for g in grads]).amax()
    exponent = torch.floor(torch.log2(largest)).clamp(-126, 126)
    return torch.where(largest > 0, torch.exp2(-exponent), torch.ones_like(largest))


class _Float16ForBfloat16(torch.autograd.Function):
    """(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0), all bfloat16 -> (y, h_n, c_n) in
    bfloat16, computed by torch.lstm in float16 (cuDNN) with the backward's gradients scaled; see
    the module docstring.

    The inner float16 graph (torch.lstm's autograd node on float16 copies, holding what cuDNN's
    backward needs) is kept through ``save_for_backward`` of its leaves and outputs, which keeps
    their autograd history: it is freed with the saved tensors (after the backward unless
    ``retain_graph``), and saved-tensor hooks (``save_on_cpu``, non-reentrant activation
    checkpointing) see its tensors as they see any other, since it was built under them. One cost:
    non-reentrant checkpointing recomputes the region twice in the backward (once to unpack the
    saved tensors, once more for the inner ``autograd.grad``), where a plain LSTM recomputes it
    once. A backward that falls back rebuilds its bfloat16 inputs from the saved float16 copies
    (the inputs the forward really used), so it runs the layer again in bfloat16."""

    @staticmethod
    def forward(ctx, *inputs):
        leaves, outputs = _graph(inputs, ctx.needs_input_grad, torch.float16)
        overflowed, ctx.columns_ok = _forward_check(inputs, leaves, outputs)
        if overflowed:
            _fell_back("forward")
            leaves, outputs = _graph(inputs, ctx.needs_input_grad, torch.bfloat16)
        ctx.save_for_backward(*leaves, *outputs)
        return tuple(o.detach().to(torch.bfloat16) for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # create_graph=True: once_differentiable would return a constant
            raise RuntimeError("sharnn_fast: the bfloat16 LSTM through cuDNN's float16 kernel computes "
                               "first-order gradients only, and a higher-order gradient was asked for "
                               "(create_graph=True); use ops.lstm(..., backend='reference')")
        saved = ctx.saved_tensors
        leaves, outputs = saved[:7], saved[7:]
        if leaves[0].dtype == torch.bfloat16:  # the forward fell back
            grads = _grad(leaves, outputs, grad_outputs, ctx.needs_input_grad)
        else:
            scale = _gradient_scale(grad_outputs)
            scaled = [(g.float() * scale).to(torch.float16) for g in grad_outputs]
            grads = [g if g is None else g.float() / scale
                     for g in _grad(leaves, outputs, scaled, ctx.needs_input_grad)]
            if _backward_lost(ctx.columns_ok, grad_outputs, grads):
                _fell_back("backward")
                leaves, outputs = _graph([t.to(torch.bfloat16) for t in leaves], ctx.needs_input_grad,
                                         torch.bfloat16)
                grads = _grad(leaves, outputs, grad_outputs, ctx.needs_input_grad)
        return tuple(g if g is None else g.to(torch.bfloat16) for g in grads)


def _graph(inputs, needs_grad, dtype):
    """torch.lstm on detached copies of ``inputs`` in ``dtype`` with an autograd graph from the
    copies that need a gradient -> (leaves, (y, h_n, c_n))."""
    with torch.enable_grad():
        leaves = [t.detach().to(dtype).requires_grad_(wanted) for t, wanted in zip(inputs, needs_grad)]
        outputs = _torch_lstm(leaves[0], leaves[1:5], leaves[5:], needs_grad=True)
    return leaves, outputs


def _grad(leaves, outputs, grad_outputs, needs_grad) -> list:
    """The gradients of the leaves that need one (None for the others); the graph is kept, so that
    a backward with ``retain_graph=True`` can run again."""
    wanted = [leaf for leaf, need in zip(leaves, needs_grad) if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, retain_graph=True))
    return [next(grads) if need else None for need in needs_grad]


def _backward_lost(columns_ok, grad_outputs, grads) -> bool:
    """Whether the float16 backward lost what bfloat16 holds (one synchronisation): a non-finite
    gradient of x, h0 or c0 in a column whose inputs and incoming gradients are all finite, or a
    non-finite weight gradient while every column is (a weight gradient sums over all columns, so
    one non-finite column makes it non-finite in bfloat16 too)."""
    columns = columns_ok & _finite_columns(grad_outputs)
    dx, dw, dhc = grads[0], grads[1:5], grads[5:]
    per_column = [g for g in (dx, *dhc) if g is not None]
    weights = [g for g in dw if g is not None]
    lost = torch.zeros((), dtype=torch.bool, device=columns.device)
    if per_column:
        lost = lost | (columns & ~_finite_columns(per_column)).any()
    if weights:
        lost = lost | (columns.all() & ~_all_finite(weights))
    return bool(lost)


@functools.lru_cache(maxsize=None)
def cpu_lstm_failure(dtype: torch.dtype, needs_grad: bool) -> Optional[str]:
    """Why torch.lstm cannot run ``dtype`` on this CPU, or None. oneDNN's reduced-precision LSTM
    depends on the instruction set (e.g. bfloat16 needs more than AVX2 on some oneDNN versions), so
    it is tried once, on a tiny problem with fixed inputs (no random numbers drawn)."""
    T, B, H = 2, 1, 4
    x = torch.linspace(-1, 1, T * B * H).view(T, B, H).to(dtype)
    weights = [torch.linspace(-0.5, 0.5, 4 * H * H).view(4 * H, H).to(dtype) for _ in range(2)]
    weights += [torch.zeros(4 * H, dtype=dtype) for _ in range(2)]
    hx = (torch.zeros(1, B, H, dtype=dtype),) * 2
    try:
        with torch.enable_grad():
            for t in (x, *weights):
                t.requires_grad_(needs_grad)
            y, _, _ = _torch_lstm(x, weights, hx, needs_grad)
            if needs_grad:
                y.sum().backward()
    except RuntimeError as err:
        return (f"torch.lstm cannot run {dtype} on this CPU ({str(err).splitlines()[0]}); "
                "use backend='reference' or float32")
    return None


def why_not(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None) -> Optional[str]:
    dtype = compute_dtype(x)
    if x.device.type != "cpu" or dtype not in _PROBED_DTYPES or torch.compiler.is_compiling():
        return None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, *(hx or ())))
    return cpu_lstm_failure(dtype, needs_grad)


def twice_differentiable(x, *args) -> bool:
    """ATen's CPU LSTM in float32/float64 is differentiable twice (tested against the reference);
    cuDNN's and oneDNN's reduced-precision LSTMs have no double backward."""
    return x.device.type == "cpu" and compute_dtype(x) in (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# The custom op torch.compile sees (see the module docstring)
# ------------------------------------------------------------------------------------------------

_ONEDNN_LSTM = 2  # oneDNN's RNN kind for an LSTM (ideep::rnn_kind::LSTM), as ATen passes it


def _uses_onednn(x: torch.Tensor) -> bool:
    """Whether the custom op runs oneDNN's LSTM kernels: where torch.lstm itself would (CPU,
    float32, oneDNN built in and enabled)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _onednn_arguments(H: int, train: bool) -> dict:
    # One forward layer, sequence first, with biases: what ATen's CPU LSTM passes.
    return dict(reverse=False, batch_sizes=[], mode=_ONEDNN_LSTM, hidden_size=H, num_layers=1,
                has_biases=True, bidirectional=False, batch_first=False, train=train)


def _onednn_forward(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train: bool):
    """oneDNN's LSTM layer as torch.lstm runs it on CPU in float32 -> (y, h_n, c_n, workspace);
    the workspace (uint8, oneDNN's own size) is what its backward needs, kept only when ``train``."""
    a = _onednn_arguments(weight_hh.shape[1], train)
    # ATen keeps the workspace only with grad mode on; below autograd, no graph is built.
    with torch.set_grad_enabled(train):
        return torch.ops.aten.mkldnn_rnn_layer(
            x.contiguous(), weight_ih, weight_hh, bias_ih, bias_hh, h0.contiguous(), c0.contiguous(),
            a["reverse"], a["batch_sizes"], a["mode"], a["hidden_size"], a["num_layers"],
            a["has_biases"], a["bidirectional"], a["batch_first"], a["train"])


class _Workspaces:
    """oneDNN's workspaces from training forwards of the custom op, until their backward takes them.

    The workspace cannot be an output of the op: its size is oneDNN's business, and a tensor of
    unknown size in a traced graph is a graph break. So it waits here, filed under the address of
    the y, h_n and c_n it came with (alive until the backward, which receives them). An entry is
    dropped when its backward takes it or when its y is freed (a forward without a backward); a
    backward that finds no entry, or one filed for other tensors, runs the forward again instead."""

    def __init__(self):
        self._entries: dict = {}
        self.recomputed = 0  # backwards that found no workspace (tests read it)

    @staticmethod
    def _key(y, h_n, c_n):
        return y.data_ptr(), h_n.data_ptr(), c_n.data_ptr()

    def put(self, y, h_n, c_n, workspace) -> None:
        key = self._key(y, h_n, c_n)
        self._entries[key] = (workspace, tuple(y.shape))
        weakref.finalize(y, self._drop, key, workspace)

    def _drop(self, key, workspace) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is workspace:
            del self._entries[key]

    def take(self, y, h_n, c_n):
        entry = self._entries.pop(self._key(y, h_n, c_n), None)
        if entry is None or entry[1] != tuple(y.shape):
            self.recomputed += 1
            return None
        return entry[0]


WORKSPACES = _Workspaces()


@torch.library.custom_op("sharnn_fast::lstm_torch_fwd", mutates_args=())
def lstm_torch_fwd(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                   bias_ih: torch.Tensor, bias_hh: torch.Tensor, h0: torch.Tensor,
                   c0: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer, all inputs in one dtype: x [T, B, I], weights in nn.LSTM's layout, h0 and c0
    [1, B, H] -> (y [T, B, H], h_n [1, B, H], c_n [1, B, H]). ``train``: a backward may follow
    (oneDNN then keeps its workspace for it, see :class:`_Workspaces`)."""
    if _uses_onednn(x):
        y, h_n, c_n, workspace = _onednn_forward(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train)
        if train:
            WORKSPACES.put(y, h_n, c_n, workspace)
        return y, h_n, c_n
    return _torch_lstm(x, (weight_ih, weight_hh, bias_ih, bias_hh), (h0, c0), needs_grad=False)


@lstm_torch_fwd.register_fake
def _(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train):
    T, B, H = x.shape[0], x.shape[1], weight_hh.shape[1]
    return x.new_empty(T, B, H), x.new_empty(1, B, H), x.new_empty(1, B, H)


@torch.library.custom_op("sharnn_fast::lstm_torch_bwd", mutates_args=())
def lstm_torch_bwd(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                   bias_ih: torch.Tensor, bias_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                   y: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor, grad_y: torch.Tensor,
                   grad_h_n: torch.Tensor, grad_c_n: torch.Tensor) -> tuple[
                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor]:
    """Gradients of lstm_torch_fwd's (y, h_n, c_n) with respect to (x, weight_ih, weight_hh,
    bias_ih, bias_hh, h0, c0), each in its input's dtype, given the forward's inputs and outputs.
    oneDNN path: with the forward's workspace (:class:`_Workspaces`), else after running the
    forward again for one."""
    if _uses_onednn(x):
        workspace = WORKSPACES.take(y, h_n, c_n)
        if workspace is None:
            y, h_n, c_n, workspace = _onednn_forward(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train=True)
        a = _onednn_arguments(weight_hh.shape[1], train=True)
        grads = torch.ops.aten.mkldnn_rnn_layer_backward(
            x.contiguous(), weight_ih, weight_hh, bias_ih, bias_hh, h0.contiguous(), c0.contiguous(),
            y, h_n, c_n, grad_y.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(),
            a["reverse"], a["mode"], a["hidden_size"], a["num_layers"], a["has_biases"], a["train"],
            a["bidirectional"], a["batch_sizes"], a["batch_first"], workspace)
        dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = grads
        db_hh = db_hh.clone() if db_hh.data_ptr() == db_ih.data_ptr() else db_hh  # one sum, two outputs
    else:
        dx, dw_ih, dw_hh, db_ih, dh0, dc0 = _bptt(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0,
                                                   y, grad_y, grad_h_n, grad_c_n)
        db_hh = db_ih.clone()  # both biases enter the gates as one sum
    inputs = (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    return tuple(g.to(t.dtype) for g, t in zip((dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0), inputs))


@lstm_torch_bwd.register_fake
def _(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, y, h_n, c_n, grad_y, grad_h_n, grad_c_n):
    return tuple(torch.empty_like(t) for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0))


def _bptt(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, y, grad_y, grad_h_n, grad_c_n):
    """Backpropagation through time for one LSTM layer (Hochreiter & Schmidhuber 1997; gate order
    i, f, g, o as nn.LSTM), in plain tensor operations on any device, in at least float32.

    The gates are recomputed from x and the forward's y (h_{t-1} = y[t - 1], h0 first) with two
    GEMMs over all steps, the cell states with one elementwise update per step; then, from the
    last step back, dh_{t-1} = dgates_t W_hh is the one product per step. Returns (dx [T, B, I],
    dW_ih, dW_hh, db (for each bias), dh0 [1, B, H], dc0 [1, B, H]) in at least float32."""
    wide = math_dtype(x.dtype)
    x, weight_ih, weight_hh, h0, c0, y, grad_y = (t.to(wide) for t in (x, weight_ih, weight_hh, h0, c0, y, grad_y))
    T = x.shape[0]
    h_prev = torch.cat([h0, y[:-1]])  # [T, B, H]
    gates = x @ weight_ih.T + h_prev @ weight_hh.T + (bias_ih.to(wide) + bias_hh.to(wide))  # [T, B, 4H]
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = torch.empty_like(i)  # [T, B, H]: the cell state after each step
    c_prev = c0[0]
    for t in range(T):
        c_prev = c[t] = f[t] * c_prev + i[t] * g[t]
    tanh_c = c.tanh()
    c_before = torch.cat([c0, c[:-1]])  # [T, B, H]: the cell state entering each step
    d_gates = torch.empty_like(gates)  # [T, B, 4H]
    dh, dc = grad_h_n[0].to(wide), grad_c_n[0].to(wide)  # [B, H] each
    for t in reversed(range(T)):
        dh = dh + grad_y[t]
        dc = dc + dh * o[t] * (1 - tanh_c[t] ** 2)
        di, df, dg, do = d_gates[t].chunk(4, dim=-1)
        torch.mul(dc * g[t], i[t] * (1 - i[t]), out=di)
        torch.mul(dc * c_before[t], f[t] * (1 - f[t]), out=df)
        torch.mul(dc * i[t], 1 - g[t] ** 2, out=dg)
        torch.mul(dh * tanh_c[t], o[t] * (1 - o[t]), out=do)
        dc = dc * f[t]
        dh = d_gates[t] @ weight_hh  # [B, H]: the gradient reaching h_{t-1}
    flat = d_gates.flatten(0, 1)  # [T * B, 4H]
    dx = d_gates @ weight_ih  # [T, B, I]
    dw_ih = flat.T @ x.flatten(0, 1)  # [4H, I]
    dw_hh = flat.T @ h_prev.flatten(0, 1)  # [4H, H]
    return dx, dw_ih, dw_hh, flat.sum(0), dh[None], dc[None]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], *output)


def _backward(ctx, grad_y, grad_h_n, grad_c_n):
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, y, h_n, c_n = ctx.saved_tensors
    # An output that nothing used has no gradient: zeros of its shape.
    grad_y, grad_h_n, grad_c_n = (torch.zeros_like(t) if g is None else g
                                  for g, t in ((grad_y, y), (grad_h_n, h_n), (grad_c_n, c_n)))
    grads = lstm_torch_bwd(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, y, h_n, c_n,
                           grad_y, grad_h_n, grad_c_n)
    return (*grads, None)


lstm_torch_fwd.register_autograd(_backward, setup_context=_setup_context)
