"""The one place that decides which implementation of an op runs.

Precedence, first match wins: the call's ``backend=`` argument (the model passes its own ``backend``
this way), then :func:`set_backend`, then the ``SHARNN_FAST_BACKEND`` environment variable, then
``"auto"``.

An op describes its implementations with :class:`Implementation`; :func:`choose` picks one. A backend
asked for explicitly that cannot run raises :class:`BackendUnavailableError` saying why and how to fix
it. ``"auto"`` walks the preference list for the device (fastest first, as measured by the benchmarks
in ``benchmarks/``) and silently takes the first implementation that can run, or, with autotuning on,
the choice :mod:`sharnn_fast.autotuning` measured and checked on this machine; :func:`explain` reports
what ran and why. :func:`run` chooses, runs, and makes a higher-order gradient through an
implementation whose backward is not differentiable raise instead of return a wrong value.
:func:`autotune_model` tunes every op of a model up front and returns :func:`explain`'s report.

This module uses :mod:`sharnn_fast.autotuning`, never the other way round.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch.utils._pytree import tree_leaves

from . import autotuning  # light: it imports nothing heavy until it tunes

BACKENDS = ("reference", "torch", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "SHARNN_FAST_BACKEND"

# Fastest first, per op and device type; an op or device not listed uses _DEFAULT_PREFERENCE. An
# entry is a tuple, or a function of the call (its arguments and compute dtype) returning one and
# the reason for it (shown by explain()), or None for no reason beyond the table.
# A kernel enters a list only once benchmarks/ has measured it faster than what follows it on that
# device (benchmarks/results/). On CPU PyTorch's own ops beat the step-by-step reference. On CUDA,
# measured on an H200 on 2026-12-04 at the paper's sizes, forward+backward
# (benchmarks/results/gpu_check/2026-12-04_NOTES.md):
# - lstm, one layer, T 1024, B 16, H 1024: fp16 torch (cuDNN's persistent algorithm) 8.80 ms, cuda
#   14.2; bf16 cuda 14.1 ms, triton 18.6, torch (cuDNN's standard algorithm) 36.8; fp32 cuda 36.3,
#   torch 49.1, triton 66.8. cuDNN's persistent LSTM runs float16 only, on some shapes
#   (cudnn_persistent_lstm); everywhere else the cuda kernel is the fastest.
# - attention, d 1024, Tq 1024, Tk 5000, bf16, dropout 0.1: triton 3.95 ms, torch 7.20 (its
#   materialised path), SDPA 21.7. (Forward only at Tk 1024, SDPA's 0.41 ms beats triton's 0.45.)
# - boom, d 1024, F 4096, bf16: triton 2.31 ms, torch 4.00.
# A whole training step (bf16, single head, memory 3976) with these choices took 73.9 ms against the
# torch backend's 174 ms; the published model took 55.3 ms, because under bf16 autocast its nn.LSTM
# runs cuDNN in float16 (PyTorch's autocast rule for cuDNN RNNs, see the notes). Since then the
# torch backend runs a bfloat16 LSTM at those sizes through the same float16 cuDNN kernel, with
# exact casts and gradients scaled per call (ops/lstm/torch_native.py), so it comes first for
# bfloat16 there too. That choice is predicted from the float16 figure above plus its overheads (casts
# and finiteness checks: a few passes over [T, B, H] tensors, and one synchronisation per forward
# and per backward, estimated well under a millisecond a layer); nothing of it has run on a GPU yet.


def cudnn_persistent_lstm(x, weight_ih, weight_hh, *rest, dtype: torch.dtype) -> bool:
    """Whether PyTorch runs this LSTM call (x [T, B, I], weight_hh [4H, H]) with cuDNN's persistent
    algorithm, its fastest: float16 only, one layer, H <= 1024, H and I multiples of 128, and on
    sm_80 or newer with at least 98 SMs and a minor version other than 6 (not sm_86), B a multiple
    of 8 and at most 128 (PyTorch's aten/src/ATen/native/cudnn/RNN.cpp, get_algo and
    use_persist_common/device_heuristics). Other GPUs (Volta and Turing have their own rules) are
    left to the cuda kernel."""
    B, I, H = x.shape[1], x.shape[2], weight_hh.shape[1]
    if not (dtype == torch.float16 and x.is_cuda and torch.backends.cudnn.is_available()
            and torch.backends.cudnn.enabled and H <= 1024 and H % 128 == 0 and I % 128 == 0
            and B % 8 == 0 and B <= 128):
        return False
    device = torch.cuda.get_device_properties(x.device)
    return device.major >= 8 and device.multi_processor_count >= 98 and device.minor != 6


def lstm_bfloat16_via_float16(x, weight_hh, dtype: torch.dtype) -> bool:
    """Whether the "torch" LSTM runs this call (x [T, B, I] in compute dtype ``dtype``, weight_hh
    [4H, H]) in float16 on cuDNN's persistent algorithm although it is bfloat16
    (ops/lstm/torch_native.py): eager, outside CUDA graph capture (its overflow check
    synchronises), where float16 gets that algorithm and bfloat16 does not (H > 128: at H <= 128
    get_algo gives every dtype its persistent small-H algorithm)."""
    return (dtype == torch.bfloat16 and weight_hh.shape[1] > 128
            and cudnn_persistent_lstm(x, None, weight_hh, dtype=torch.float16)
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def _lstm_on_cuda(args: tuple, dtype: torch.dtype) -> tuple[tuple[str, ...], Optional[str]]:
    x, _, weight_hh = args[:3]
    if dtype == torch.float16 and cudnn_persistent_lstm(*args, dtype=dtype):
        return ("torch", "cuda", "triton", "reference"), "float16 at these sizes: cuDNN's persistent LSTM"
    if lstm_bfloat16_via_float16(x, weight_hh, dtype):
        return (("torch", "cuda", "triton", "reference"),
                "bfloat16 at these sizes: cuDNN's persistent float16 LSTM, exact casts, gradients "
                "scaled per call (predicted faster, not yet measured on a GPU)")
    return ("cuda", "triton", "torch", "reference"), None


Preference = Union[tuple[str, ...], Callable[[tuple, torch.dtype], tuple[tuple[str, ...], Optional[str]]]]
_AUTO_PREFERENCE: dict[str, dict[str, Preference]] = {
    "lstm": {"cuda": _lstm_on_cuda},
    "attention": {"cuda": ("triton", "torch", "reference")},
    "boom": {"cuda": ("triton", "torch", "reference")},
}
_DEFAULT_PREFERENCE = ("torch", "reference")

log = logging.getLogger("sharnn_fast.backend")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def _never_unsupported(*args, **kwargs) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op.

    ``run`` takes the op's arguments; ``why_not`` takes the same arguments and returns ``None`` when
    ``run`` can handle them, else a sentence saying why not and how to fix it.
    ``double_backward`` says whether the gradients ``run`` produces are themselves differentiable
    (exactly, to the dtype's tolerance) for these arguments: a bool, or a function of the op's
    arguments. Where it is False, :func:`run` makes a higher-order gradient raise instead of
    silently returning a wrong value.
    """

    run: Callable
    why_not: Callable[..., Optional[str]] = _never_unsupported
    double_backward: Union[bool, Callable[..., bool]] = False

    def supports_double_backward(self, *args, **kwargs) -> bool:
        flag = self.double_backward
        return bool(flag(*args, **kwargs) if callable(flag) else flag)


class LazyImplementation:
    """An implementation whose module is imported on first use: Triton and the CUDA extension are
    optional and slow to import, and importing them must not touch the GPU at package import.

    The module defines ``IMPLEMENTATION`` (an :class:`Implementation`). If it cannot be imported,
    ``why_not`` says why and ``run`` raises.
    """

    instances: list["LazyImplementation"] = []

    def __init__(self, module: str, missing_hint: str):
        self.module, self.missing_hint = module, missing_hint
        self.backend = module.rsplit(".", 1)[1]  # sharnn_fast.ops.<op>.<backend>
        self._loaded: Optional[Implementation] = None
        self._error: Optional[str] = None
        LazyImplementation.instances.append(self)

    def _load(self) -> Optional[Implementation]:
        if self._loaded is None and self._error is None:
            try:
                self._loaded = importlib.import_module(self.module).IMPLEMENTATION
            except ImportError as err:
                self._error = f"{err}; {self.missing_hint}"
        return self._loaded

    def why_not(self, *args, **kwargs) -> Optional[str]:
        impl = self._load()
        return self._error if impl is None else impl.why_not(*args, **kwargs)

    def run(self, *args, **kwargs):
        impl = self._load()
        if impl is None:
            raise BackendUnavailableError(self._error)
        return impl.run(*args, **kwargs)

    def supports_double_backward(self, *args, **kwargs) -> bool:
        """Never imports: a module not loaded yet has not run, and says nothing here."""
        return self._loaded is not None and self._loaded.supports_double_backward(*args, **kwargs)


TRITON_HINT = ("the triton backend needs `pip install triton` (CUDA GPUs; CPU only under "
               "TRITON_INTERPRET=1); use backend='torch' or backend='auto' meanwhile")
CUDA_HINT = "the cuda backend needs sharnn_fast built with nvcc (see sharnn_fast.build_info())"


_process_backend: Optional[str] = None
_last_choice: dict[str, str] = {}
_last_path: dict[str, tuple[Optional[str], str]] = {}  # op -> (the choice it ran under, its path)


def validate_backend(name, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, CHOICES))}; got {name!r}")
    return name


def preload(name: Optional[str]) -> None:
    """Import the implementations of backend ``name`` now rather than at their first call, which
    may be inside torch.compile's tracing (where an import breaks the graph)."""
    for lazy in LazyImplementation.instances:
        if lazy.backend == name:
            lazy._load()


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend (``None`` restores the environment variable or ``"auto"``)."""
    global _process_backend
    _process_backend = None if name is None else validate_backend(name)
    preload(_process_backend)


def get_backend() -> str:
    """The process-wide backend: :func:`set_backend`, else ``$SHARNN_FAST_BACKEND``, else ``"auto"``."""
    if _process_backend is not None:
        return _process_backend
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return validate_backend(from_env.strip(), argument=f"environment variable {ENV_VAR}")
    return "auto"


def _missing(op: str, name: str) -> str:
    return (f"sharnn_fast has no {name!r} implementation of {op} in this version; "
            f"use backend='torch' or backend='auto'")


@dataclass(frozen=True)
class Tuning:
    """What :mod:`sharnn_fast.autotuning` needs to know about one call of an op: its shape bucket
    (lengths, batch sizes and token counts rounded up by ``ops._buckets.pow2``, widths exact), its
    compute dtype, whether dropout is active, and ``deterministic``, which maps the op's arguments
    to the same call with dropout off (to check backends against each other).

    ``bucket`` is a function returning the tuple, called only when tuning: computing it from sizes
    that torch.compile traces symbolically would specialise the compiled graph to them."""

    bucket: Callable[[], tuple]
    dtype: torch.dtype
    dropout: bool = False
    deterministic: Callable[[tuple], tuple] = lambda args: args


def without_dropout(args: tuple) -> tuple:
    """The arguments of an op whose last two are ``dropout_p, training`` (attention, Boom), with
    dropout off: the deterministic call autotuning compares backends on."""
    return (*args[:-2], 0.0, False)


def choose(op: str, requested: Optional[str], implementations: Mapping[str, Implementation],
           device: torch.device, *args, tuning: Optional[Tuning] = None) -> tuple[str, Implementation]:
    """Pick the implementation of ``op`` for these arguments (``*args`` are the op's). Returns its
    backend name and the implementation. With autotuning on and ``tuning`` given, "auto" takes the
    measured choice (see :mod:`sharnn_fast.autotuning`)."""
    name = get_backend() if requested is None else validate_backend(requested)
    if name != "auto":
        impl = implementations.get(name)
        reason = _missing(op, name) if impl is None else impl.why_not(*args)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {reason}")
        _record(op, name, f"requested explicitly, on {device.type}")
        return name, impl

    if tuning is not None:
        if autotuning.enabled() and autotuning.may_tune_now(device):
            tuned, why = autotuning.choose(op, implementations, device, args, tuning.dtype, tuning.bucket(),
                                         tuning.dropout, tuning.deterministic)
            # A choice holds for its whole shape bucket; a backend with a shape limit inside the
            # bucket (the cuda LSTM's planner) may still refuse these exact sizes.
            if implementations[tuned].why_not(*args) is None:
                _record(op, tuned, why)
                return tuned, implementations[tuned]

    skipped = []
    preference, because = _AUTO_PREFERENCE.get(op, {}).get(device.type, _DEFAULT_PREFERENCE), None
    if callable(preference):
        preference, because = preference(args, tuning.dtype if tuning is not None else args[0].dtype)
    for candidate in preference:
        impl = implementations.get(candidate)
        reason = _missing(op, candidate) if impl is None else impl.why_not(*args)
        if reason is None:
            why = (f"auto on {device.type}, static preference" + (f" ({because})" if because else "")
                   + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
            _record(op, candidate, why)
            return candidate, impl
        skipped.append(f"{candidate} ({reason})")
    raise BackendUnavailableError(f"no backend can run {op} on {device.type}: {'; '.join(skipped)}")


def run(op: str, requested: Optional[str], implementations: Mapping[str, Implementation],
        device: torch.device, *args, tuning: Optional[Tuning] = None):
    """Choose the implementation of ``op`` (see :func:`choose`) and run it on ``args``.

    If autograd records the call and the chosen implementation's gradients are not differentiable
    for these arguments, every output gets a hook that raises, naming the op, the backend and the
    backends that can, as soon as a backward builds a graph of itself (``create_graph=True``, the
    first step of any higher-order gradient). The hook sits on the outputs, so no path to a second
    derivative can go around it.
    """
    name, impl = choose(op, requested, implementations, device, *args, tuning=tuning)
    outputs = impl.run(*args)
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not impl.supports_double_backward(*args)):
        tensors = [t for t in tree_leaves(outputs) if t.requires_grad]
        if tensors:
            able = [n for n, other in implementations.items() if other.supports_double_backward(*args)]
            picked = "" if name == (requested or get_backend()) else " (picked by 'auto')"
            message = (f"ops.{op}: backend {name!r}{picked} computes first-order gradients only, and a "
                       "higher-order gradient was asked for (a backward with create_graph=True, as "
                       "for a gradient penalty or a Hessian-vector product). Backends that compute "
                       f"it exactly for these inputs: {', '.join(map(repr, able))}; choose one with "
                       f"backend=... on the op or the model")
            for t in tensors:
                t.register_hook(functools.partial(_refuse_graph_of_backward, message))
    return outputs


def _refuse_graph_of_backward(message: str, grad):
    # The autograd engine runs a backward, hooks included, with grad mode on exactly when it was
    # asked to build a graph of the backward (create_graph=True).
    if torch.is_grad_enabled():
        raise RuntimeError(message)
    return grad


def _record(op: str, name: str, why: str) -> None:
    if torch.compiler.is_compiling():
        return  # a side effect torch.compile would break the graph for; the choice is made anyway
    line = f"{op}: {name} ({why})"
    if _last_choice.get(op) != line:
        _last_choice[op] = line
        log.debug(line)


def note_path(op: str, describe: Callable[[], str]) -> None:
    """For an implementation with more than one path (the triton attention: flash kernel or
    materialised scores): ``describe()`` says which one runs and why; explain() adds it to the op's
    line while the same choice stands. Not called under torch.compile tracing."""
    if torch.compiler.is_compiling():
        return
    entry = (_last_choice.get(op), describe())
    if _last_path.get(op) != entry:
        _last_path[op] = entry
        log.debug(f"{op}: {entry[1]}")


def explain() -> str:
    """Which implementation ran last for each op, and why (and which path, where it has several)."""
    if not _last_choice:
        return "no sharnn_fast op has run yet in this process"
    lines = []
    for op in sorted(_last_choice):
        choice, path = _last_path.get(op, (None, None))
        lines.append(_last_choice[op] + (f"; {path}" if choice == _last_choice[op] else ""))
    return "\n".join(lines)


def autotune_model(model, example_tokens, **forward_kwargs) -> str:
    """Tune every op of one forward and backward of ``model`` on ``example_tokens`` [T, B] now,
    so that training starts with its choices made (and cached), and turn autotuning on for the
    process (``autotune(True)``), since "auto" uses tuned choices only while it is on. The model's
    parameters, their gradients and the random number generators are left as they were. Returns
    :func:`explain`'s report.

    Tune with the segment length, batch size, dtype (autocast) and mode (``model.train()`` or
    ``eval()``) that training will use: each is part of the key.
    """
    device = example_tokens.device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    saved_grads = {p: p.grad for p in model.parameters()}
    autotuning.autotune(True)
    try:
        with torch.random.fork_rng(devices=devices):
            h = model(example_tokens, **forward_kwargs)[0]
            if torch.is_grad_enabled() and h.requires_grad:
                model.decoder(h).float().logsumexp(-1).mean().backward()
    finally:
        for p, g in saved_grads.items():
            p.grad = g
    return explain()
