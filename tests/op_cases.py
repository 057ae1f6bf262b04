"""The ops as the tests see them, one entry each: fresh random inputs, and how to call the op.

Tests that cover every op (the dtype contract, higher-order gradients, autotuning) and the smoke
step of the GPU check (tools/gpu_smoke.py) loop over OP_CASES; the tests of one op make their inputs
with lstm_inputs, attention_inputs or boom_inputs. Adding an op means adding one OpCase here.

This module needs torch and sharnn_fast only (no pytest): tools/gpu_smoke.py puts tests/ on
sys.path and imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sharnn_fast import ops
from tolerances import assert_all_close, compare_in_reduced_precision_over_draws, outputs_and_grads


# ---- inputs ----------------------------------------------------------------------------------------
# Fresh random draws from torch's global generator, on ``device`` in ``dtype``: never zeros.
def lstm_inputs(T, B, I, H, device="cpu", dtype=torch.float32, with_state=True) -> dict:
    """x [T, B, I]; weight_ih [4H, I], weight_hh [4H, H], bias_ih and bias_hh [4H] uniform in
    +-1/sqrt(H), the scale nn.LSTM initialises to; with_state: h0 and c0 [1, B, H]."""
    k = H ** -0.5

    def u(*shape):
        return torch.empty(*shape, device=device, dtype=dtype).uniform_(-k, k)

    inputs = dict(x=torch.randn(T, B, I, device=device, dtype=dtype),
                  weight_ih=u(4 * H, I), weight_hh=u(4 * H, H), bias_ih=u(4 * H), bias_hh=u(4 * H))
    if with_state:
        inputs.update(h0=0.5 * torch.randn(1, B, H, device=device, dtype=dtype),
                      c0=0.5 * torch.randn(1, B, H, device=device, dtype=dtype))
    return inputs


def attention_inputs(Tq, Tk, B, d, dv=None, device="cpu", dtype=torch.float32) -> dict:
    """q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] (dv = d unless given), standard normal."""
    return dict(q=torch.randn(Tq, B, d, device=device, dtype=dtype),
                k=torch.randn(Tk, B, d, device=device, dtype=dtype),
                v=torch.randn(Tk, B, d if dv is None else dv, device=device, dtype=dtype))


def boom_inputs(lead, d, F, device="cpu", dtype=torch.float32, bias=True) -> dict:
    """x [*lead, d] standard normal, weight [F, d] scaled by 1/sqrt(d), bias [F] scaled by 0.1
    (left out without ``bias``)."""
    inputs = dict(x=torch.randn(*lead, d, device=device, dtype=dtype),
                  weight=torch.randn(F, d, device=device, dtype=dtype) * d ** -0.5)
    if bias:
        inputs.update(bias=0.1 * torch.randn(F, device=device, dtype=dtype))
    return inputs


# ---- calls -----------------------------------------------------------------------------------------
def _call_lstm(t: dict, **options):
    h0 = t.get("h0")
    hx = None if h0 is None else (h0, t.get("c0"))
    return ops.lstm(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], hx, **options)


def _call_attention(t: dict, **options):
    return ops.attention(t["q"], t["k"], t["v"], **options)


def _call_boom(t: dict, **options):
    return ops.boom(t["x"], t["weight"], t.get("bias"), **options)


@dataclass(frozen=True)
class OpCase:
    """One op: its inputs by name and in order, how to make them, and how to call it.

    ``call(inputs, **options)`` runs the op on the dict ``inputs`` (an optional input left out is
    None), ``options`` being the op's keyword arguments (backend, dropout_p, training).
    ``shapes`` names small shapes for ``make_inputs``: "small" (mixed widths under 10), "odd"
    (odd widths; small enough for float64 second derivatives), "smoke" (widths of at least 16,
    tl.dot's smallest, for the GPU smoke check)."""
    name: str
    arguments: tuple  # the input names, in the op's positional order
    optional: tuple  # the inputs that may be left out
    has_dropout: bool  # whether the op takes dropout_p and training
    make_inputs: Callable[..., dict]  # make_inputs(*shape, device=, dtype=) -> {name: tensor}
    shapes: dict  # variant -> the shape arguments of make_inputs
    call: Callable  # call(inputs, **options) -> the op's result

    def inputs(self, variant: str = "small", device="cpu", dtype=torch.float32, *,
               leave_out: tuple = ()) -> dict:
        """Fresh random inputs of the shape named ``variant``, without the optional ones named in
        ``leave_out``."""
        assert set(leave_out) <= set(self.optional), f"{self.name} cannot do without {set(leave_out) - set(self.optional)}"
        inputs = self.make_inputs(*self.shapes[variant], device=device, dtype=dtype)
        return {name: t for name, t in inputs.items() if name not in leave_out}

    def run(self, backend: Optional[str], **options) -> Callable:
        """fn(*tensors, **named_tensors) -> the op's result on ``backend``, tensors taken in the
        order of ``arguments`` (as gradcheck passes them) or by name (as outputs_and_grads does)."""
        def fn(*tensors, **named):
            return self.call(dict(zip(self.arguments, tensors), **named), backend=backend, **options)
        return fn

    def assert_matches_reference(self, backend: str, inputs: dict, tolerance, what: str = "", **options):
        """Every output of ``backend`` and the gradient of every input, for a fixed random
        cotangent, within ``tolerance`` (a key of tolerances.TOLERANCE or a number) of the
        reference's on the same inputs."""
        assert_all_close(outputs_and_grads(self.run(backend, **options), inputs),
                         outputs_and_grads(self.run("reference", **options), inputs), tolerance,
                         what=what or f"{backend} {self.name}")

    def assert_reduced_precision(self, backend: str, shape: tuple, dtype: torch.dtype, device, draws: int = 3):
        """``backend`` on fresh inputs of ``shape`` cast to ``dtype``, held to the float32 reference
        (tolerances.compare_in_reduced_precision_over_draws: the worst over ``draws`` draws)."""
        compare_in_reduced_precision_over_draws(self.run(backend), self.run("reference"),
                                                lambda: self.make_inputs(*shape, device=device), dtype, draws)


LSTM = OpCase(
    name="lstm", arguments=("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0"),
    optional=("h0", "c0"), has_dropout=False, make_inputs=lstm_inputs, call=_call_lstm,
    shapes=dict(small=(5, 3, 6, 4), odd=(3, 2, 5, 3), smoke=(5, 3, 16, 32)))  # T, B, I, H
ATTENTION = OpCase(
    name="attention", arguments=("q", "k", "v"), optional=(), has_dropout=True,
    make_inputs=attention_inputs, call=_call_attention,
    shapes=dict(small=(4, 7, 3, 8, 6), odd=(3, 6, 2, 5, 4), smoke=(5, 9, 2, 32, 32)))  # Tq, Tk, B, d, dv
BOOM = OpCase(
    name="boom", arguments=("x", "weight", "bias"), optional=("bias",), has_dropout=True,
    make_inputs=boom_inputs, call=_call_boom,
    shapes=dict(small=((4, 3), 8, 24), odd=((3, 2), 5, 15), smoke=((5, 2), 32, 64)))  # lead, d, F

OP_CASES = {case.name: case for case in (LSTM, ATTENTION, BOOM)}
