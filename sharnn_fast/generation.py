"""Text generation with SHARNN: a prefill of the prompt through the full-sequence path, then an
incremental per-token decoder, and the standard sampling rules (temperature, top-k, top-p).

Prefill runs ``model(prompt, hidden, mems)``, so it uses the model's backend (the fused kernels
where they run). Decode is one token per step through each block's own one-position step
(:meth:`sharnn_fast.model.Block.step`: plain PyTorch ops, a per-token call being too small to pay
for a backend's dispatch) on preallocated state:

- **LSTM**: one ``torch.lstm_cell`` per block (one GEMM pair, the cell update fused by ATen).
- **Attention**: each attention block keeps its memory, ``lnmem`` of its input at every position,
  in a buffer of ``model.num_max_positions`` (5000) rows that is written as a ring (:class:`_RingMemory`).
  Appending a token writes one row; once the buffer is full, the new row overwrites the oldest, which is
  exactly the model's rule (the current token plus the last 4999 memory positions). Attention has
  no positional encoding, so the keys' order in the ring does not change the result. The key and
  value gates are folded into the query and the output, ``(q * kg) . m`` and ``vg * (P M)``, so the
  memory is never rescaled per token; the gates, which depend on the weights alone, are computed
  once per call, not per token.
- **Boom**: one GEMM and the GELU chunk sum, on the one token.

On CUDA the whole step is captured once in a CUDA graph and replayed (``SHARNN_GENERATE_CUDA_GRAPHS``).

**Compiling the step** (``compile=``): the step (decoder step and logits) can run through
``torch.compile(fullgraph=True, dynamic=False)``, which fuses the few dozen small ops around the
matrix products into a handful of loops. Every tensor then keeps its shape from token to token
(the static decoder: (h, c) overwritten in place, ring counters on the device), so the step
compiles once and never again for the same model, batch size, dtype, autocast state and device
(:func:`_compile_step`; the compiled function is kept per model, see :data:`_COMPILED`). On a CPU
attention reads only the rows in use, their number read from the device counter (an unbacked size
under torch.compile: one graph serves every fill of the ring); on CUDA the whole ring is attended
with a mask, so no value leaves the device and the compiled step can be captured in the CUDA graph.
Compiling costs seconds to a minute, so ``compile=None`` compiles only on a CPU and only when at
least :data:`COMPILE_MIN_TOKENS` steps are asked for (or the step is compiled already); a compile
that fails falls back to the eager step with one warning (``compile=True`` raises instead).

No memory is concatenated per token: the published per-token loop does a ``torch.cat`` of up to
5000 x d per attention block per token.

Sampling follows the usual definitions: logits divided by the temperature, then top-k (keep the k
largest logits) and top-p ("nucleus", Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", section 3.1: keep the smallest set of most likely tokens whose probability reaches
p), renormalised, all in float32.
"""
from __future__ import annotations

import logging
import math
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _env

logger = logging.getLogger(__name__)

# compile=None compiles the one-token step on a CPU from this many steps on: where the compile is
# paid back. Measured on the shared 2-core CPU of the benchmarks (2026-12-05; emsize 256, nhid 1024,
# 4 layers, B 1, float32, after a 2000-token prompt, one thread, the two steps interleaved, medians
# of 400): the compiled step took 1.9 ms, the eager one 2.6 ms, a saving of 0.7 ms per token;
# compiling took 23 s with an empty Inductor cache on the machine at its quietest (20 to 39 s under
# load; 9 to 14 s once the cache under /tmp/torchinductor_$USER holds the kernels). 23 s / 0.7 ms
# is about 33,000 tokens; rounded down.
COMPILE_MIN_TOKENS = 30_000

@dataclass
class GenerationState:
    """Where a generation stopped: every token returned so far has been read.

    ``hidden``: one (h, c) per block, each [1, B, ninp]; ``mems``: one entry per block, a tensor
    [M, B, ninp] (oldest position first, M <= num_max_positions) for attention blocks and ``[]``
    for the others. Both are exactly what ``model.forward`` takes and returns, so a state can go
    back and forth between ``generate`` and ``forward``. ``signature`` identifies the model's
    architecture, to reject a state from another model.
    """

    hidden: list
    mems: list
    signature: tuple = field(default=())

    @property
    def batch_size(self) -> int:
        return self.hidden[0][0].shape[1]


def model_signature(model) -> tuple:
    return (model.encoder.num_embeddings, model.ninp, model.nhid, model.nlayers,
            tuple(block.attn is not None for block in model.blocks))


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
def next_token_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                            top_p: Optional[float] = None) -> torch.Tensor:
    """Probabilities [B, V] (float32) of the next token after temperature, top-k and top-p.

    logits: [B, V], any float dtype. Tokens removed by top-k or top-p get probability exactly 0;
    the rest are renormalised. Ties at the top-k boundary keep every tied token. Any temperature > 0
    works, down to the smallest float (5e-324): the logits are shifted so that their maximum is 0
    and divided in float64, so a tiny temperature sends the others to -inf (probability 0) rather
    than overflowing to inf - inf = NaN; the limit is greedy, ties sharing the probability.
    """
    logits = logits.float()
    scores = ((logits - logits.amax(-1, keepdim=True)).double() / temperature).float()  # [B, V], max 0
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the tokens more likely than it hold less than p: the smallest set whose
        # total reaches p (the most likely token is always kept).
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose_next(logits, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Token ids [B] (int64) from logits [B, V]: argmax when greedy, else one draw per row."""
    if not do_sample:
        return logits.argmax(-1)
    probs = next_token_distribution(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# The incremental decoder
# ---------------------------------------------------------------------------------------------------
class _RingMemory:
    """One attention block's memory for one-token steps: ``num_max_positions`` rows written as a
    ring, filled from a memory [M, B, d] as model.forward returns it (copied: the caller's tensor
    is never written).

    ``filled`` and ``head`` (rows in use, next row to write) describe the memory before the next
    step; :meth:`advance` moves them on after each step. With ``static=True`` the step writes the
    ring through device-side copies of the two counters, so that every tensor keeps its shape and
    address from step to step, as a CUDA graph and a compile that never recompiles need. Attention
    then reads, with ``masked=True``, all of the ring with the unused rows masked (no value leaves
    the device: what a CUDA graph needs), or with ``masked=False`` only the rows in use, their
    number read from the device counter (``.item()``: free on a CPU; under torch.compile with
    ``capture_scalar_outputs`` a size known at run time, so one graph serves every fill).
    """

    def __init__(self, mem: torch.Tensor, cap: int, static: bool, masked: bool = True):
        self.cap, self.static, self.masked = cap, static, masked
        mem = mem[-cap:]
        self.ring = mem.new_zeros(cap, *mem.shape[1:])  # [cap, B, d]
        self.ring[:mem.shape[0]] = mem
        self.filled, self.head = mem.shape[0], mem.shape[0] % cap
        if static:
            self.rows = torch.arange(cap, device=mem.device)  # [cap]
            self.head_t = torch.tensor([self.head], device=mem.device)  # [1]
            self.filled_t = torch.tensor([self.filled], device=mem.device)  # [1]

    def append(self, row: torch.Tensor):
        """Write this position's row [B, d]; return what attention reads: (memory [M, B, d] in
        ring order, mask [M] bool (True: a row not in use) or None), as :meth:`Block.step` takes."""
        if self.static:
            self.ring.index_copy_(0, self.head_t, row.to(self.ring.dtype).unsqueeze(0))
            filled = self.filled_t.add_(1).clamp_(max=self.cap)
            self.head_t.add_(1).remainder_(self.cap)
            if self.masked:
                return self.ring, self.rows >= filled
            # Until the ring is full the rows in use are its first ``filled``, then all of them.
            rows = filled.item()
            torch._check(rows >= 1)
            torch._check(rows <= self.cap)
            return self.ring[:rows], None
        self.ring[self.head] = row.to(self.ring.dtype)
        return self.ring[:min(self.filled + 1, self.cap)], None

    def advance(self) -> None:
        """After a step: one more position."""
        self.head = (self.head + 1) % self.cap
        self.filled = min(self.filled + 1, self.cap)

    def tensors(self) -> list:
        """Every tensor a step writes."""
        return [self.ring, self.head_t, self.filled_t] if self.static else [self.ring]

    def state(self) -> torch.Tensor:
        """The memory [M, B, d] in model.forward's format, oldest position first."""
        if self.filled < self.cap:
            return self.ring[:self.filled].clone()
        return torch.cat([self.ring[self.head:], self.ring[:self.head]])


class _Decoder:
    """The model's state for one-token steps, built from a (hidden, mems) pair as model.forward
    returns them (copied: the caller's tensors are never written): (h, c) per block, each [B, d],
    and a :class:`_RingMemory` per attention block (None for the others). Each step runs every
    block's :meth:`~sharnn_fast.model.Block.step`.

    With ``static=True`` every tensor keeps its shape and address from step to step, as a CUDA
    graph and a compiled step need: (h, c) are overwritten in place and the memories are static
    (see :class:`_RingMemory`, also for ``masked``).
    """

    def __init__(self, model, hidden, mems, static: bool = False, masked: bool = True):
        self.model, self.static = model, static
        self.hidden = [(h[0].clone(), c[0].clone()) for h, c in hidden]  # each (h, c), each [B, d]
        self.memories = [_RingMemory(mem, model.num_max_positions, static, masked) if block.attn is not None else None
                         for block, mem in zip(model.blocks, mems)]
        # The attention gates depend on the weights alone: computed once, not at every step.
        self.gates = [block.attn.gates() if block.attn is not None else None for block in model.blocks]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Read one token per sequence (token [B]) and return the model's output h [B, d]."""
        h = self.model.encoder(token)  # [B, d]
        for i, (block, memory, gates) in enumerate(zip(self.model.blocks, self.memories, self.gates)):
            h, hidden = block.step(h, self.hidden[i], memory, gates)
            if self.static:
                for old, new in zip(self.hidden[i], hidden):
                    old.copy_(new)
            else:
                self.hidden[i] = hidden
        return h

    def advance(self) -> None:
        """After a step: one more position in every attention block's memory."""
        for memory in self.memories:
            if memory is not None:
                memory.advance()

    def memories_masked(self) -> Optional[bool]:
        """How the static memories are read (see :class:`_RingMemory`); None without attention."""
        return next((memory.masked for memory in self.memories if memory is not None), None)

    def tensors(self) -> list:
        """Every tensor a step writes (for saving and restoring around warm-up steps)."""
        written = [t for pair in self.hidden for t in pair]
        for memory in self.memories:
            if memory is not None:
                written += memory.tensors()
        return written

    def state(self) -> tuple[list, list]:
        """(hidden, mems) in model.forward's format, memories oldest first."""
        hidden = [(h.unsqueeze(0).clone(), c.unsqueeze(0).clone()) for h, c in self.hidden]
        mems = [[] if memory is None else memory.state() for memory in self.memories]
        return hidden, mems


class CompileError(RuntimeError):
    """``compile=True`` and torch.compile could not compile the decode step (the message says why)."""


def _logits_step(model, decoder: _Decoder, token: torch.Tensor) -> torch.Tensor:
    """The one-token step: token [B] (int64) -> logits [B, V], the decoder's state moved on by
    one position (before :meth:`_Decoder.advance`). What :func:`_compile_step` compiles."""
    return model.decoder(decoder.step(token))


# model -> {step key: the compiled step function}. Weak on the model, so a model that is gone takes
# its compiled steps with it. Each entry is a function of its own (its own code object), so each
# has its own Dynamo cache: one graph per entry, never a recompile, and no shared recompile limit.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# model -> {step key: why compiling failed}: compile=None does not try again (and warn again).
_COMPILE_FAILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _step_key(model, batch: int, device: torch.device, masked: bool) -> tuple:
    """What a compiled step depends on besides the weights' values (weights are inputs of the
    compiled graph, so changing them in place needs no new compile): batch size, device, the
    weights' dtype, the autocast state, the ring's size and kind, and the architecture (value
    gates collapsed or not)."""
    autocast = (torch.is_autocast_enabled(device.type),
                torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None)
    collapsed = tuple(block.attn.vq_collapsed for block in model.blocks if block.attn is not None)
    return (batch, str(device), model.encoder.weight.dtype, autocast, model.num_max_positions, masked,
            model_signature(model), collapsed)


def is_step_compiled(model, batch: int, device: torch.device, masked: bool) -> bool:
    """True when this process already compiled the step for this model and key (no compile cost)."""
    return _step_key(model, batch, device, masked) in _COMPILED.get(model, {})


def _new_compiled_step() -> Callable:
    """torch.compile of a fresh copy of :func:`_logits_step` (its own code object, so its own
    Dynamo cache), with ``capture_scalar_outputs`` so that the ring's ``.item()`` stays in the graph."""
    import torch._dynamo  # heavy: only when compiling

    fresh = types.FunctionType(_logits_step.__code__.replace(), _logits_step.__globals__, _logits_step.__name__)
    compiled = torch.compile(fresh, fullgraph=True, dynamic=False)
    return torch._dynamo.config.patch(capture_scalar_outputs=True)(compiled)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _compile_step(model, decoder: _Decoder, batch: int, required: bool) -> Optional[Callable]:
    """The compiled one-token step for ``decoder`` (a static one): a function token [B] -> logits
    [B, V], or None when compiling failed and ``required`` is False (then one warning is logged,
    and the caller decodes eagerly).

    Compiles at the first call for a key (:func:`_step_key`) and reuses the compiled function
    after that. Every call runs one step on a dummy token and puts the decoder's state back: the
    compile (or, later, a recompile that should not happen) is paid and checked here, not in the
    middle of the generation. When a graph was compiled, logs "compiled the decode step in S s"
    (logger ``sharnn_fast.generation``, level INFO). Raises :class:`CompileError` when compiling fails and
    ``required`` is True (the step then decodes nothing: the decoder's state is put back).
    """
    device = model.encoder.weight.device
    key = _step_key(model, batch, device, decoder.memories_masked())
    steps = _COMPILED.setdefault(model, {})
    failed = _COMPILE_FAILED.setdefault(model, {})
    if key in failed and not required:
        return None
    token = torch.zeros(batch, dtype=torch.int64, device=device)  # [B]
    saved = [t.clone() for t in decoder.tensors()]
    start = time.perf_counter()
    try:
        step = steps.get(key) or _new_compiled_step()
        before = _graphs_compiled()
        step(model, decoder, token)
        compiled = _graphs_compiled() - before
    except Exception as err:  # Inductor without a C++ compiler, an op Dynamo cannot trace, ...
        why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        if required:
            raise CompileError(f"compile=True, but torch.compile could not compile the decode step ({why}); "
                               "use compile=False (sharnn generate --compile off) to decode without it") from err
        failed[key] = why
        logger.warning("generate: torch.compile could not compile the decode step, decoding without it (%s)", why)
        return None
    finally:
        for t, copy in zip(decoder.tensors(), saved):  # the dummy step must leave no trace
            t.copy_(copy)
    steps[key] = step
    if compiled:
        logger.info("compiled the decode step in %.1f s (once per model and batch size)",
                    time.perf_counter() - start)
    return lambda token: step(model, decoder, token)


class _GraphedStep:
    """The one-token step (decoder step and logits, or ``run``, e.g. the compiled step) captured
    once in a CUDA graph and replayed: one launch per token instead of a few dozen. Inputs and
    outputs are static buffers."""

    WARMUP_STEPS = 2  # steps on a side stream before capture (cuBLAS handles, allocator, compiling)

    def __init__(self, model, decoder: _Decoder, batch: int, run: Optional[Callable] = None):
        device = model.encoder.weight.device
        run = run or (lambda token: _logits_step(model, decoder, token))
        self.token = torch.zeros(batch, dtype=torch.int64, device=device)  # [B]
        saved = [t.clone() for t in decoder.tensors()]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                run(self.token)
        torch.cuda.current_stream(device).wait_stream(side)
        for t, copy in zip(decoder.tensors(), saved):  # the warm-up steps must leave no trace
            t.copy_(copy)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run(self.token)  # [B, V]

    def __call__(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


def use_cuda_graphs(device: torch.device) -> bool:
    """``SHARNN_GENERATE_CUDA_GRAPHS``: ``auto`` (default: on CUDA), ``0`` (never) or ``1``."""
    setting = _env.choice("SHARNN_GENERATE_CUDA_GRAPHS")  # ValueError for another value
    return device.type == "cuda" and setting != "0"


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------
def _check_arguments(model, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, generator,
                     state, compile):
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a tensor of token ids [T, B], got {type(prompt).__name__}")
    if prompt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty [T, B] tensor (sequence first), got shape "
                         f"{list(prompt.shape)}")
    ntoken = model.encoder.num_embeddings
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= ntoken:
        raise ValueError(f"prompt has token ids in [{low}, {high}], outside the vocabulary 0 .. {ntoken - 1}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}; "
                             "use do_sample=False for greedy decoding")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if compile not in (None, True, False):
        raise TypeError(f"compile must be None (automatic), True or False, got {compile!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if state is not None:
        if not isinstance(state, GenerationState):
            raise TypeError(f"state must be a GenerationState from generate(..., return_state=True), "
                            f"got {type(state).__name__}")
        if state.signature != model_signature(model):
            raise ValueError("state comes from a model with another architecture "
                             f"{state.signature} than this one {model_signature(model)}")
        if state.batch_size != prompt.shape[1]:
            raise ValueError(f"state holds {state.batch_size} sequences but prompt has batch size "
                             f"{prompt.shape[1]}")


def use_compile(compile: Optional[bool], device: torch.device, steps: int, compiled_already: bool) -> bool:
    """Whether generate compiles its one-token step: ``compile`` True or False says so (True with
    no step to take compiles nothing); None compiles on a CPU when ``steps`` reaches
    :data:`COMPILE_MIN_TOKENS` or the step is compiled already, never on another device (there
    the step is replayed from a CUDA graph, and compiling it is for ``compile=True`` to ask)."""
    if steps < 1:
        return False
    if compile is not None:
        return compile
    return device.type == "cpu" and (steps >= COMPILE_MIN_TOKENS or compiled_already)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, *, do_sample=True, temperature=1.0, top_k=None, top_p=None,
             generator=None, state=None, return_state=False, on_token=None, static=None, compile=None):
    """See :meth:`sharnn_fast.SHARNN.generate`. ``on_token(tokens [B])``, if given, is called with
    every new token as soon as it is chosen (for streaming). ``static``: decode with fixed-shape
    tensors, the ring attended whole with a mask (replayed from a CUDA graph on CUDA); None decides
    by :func:`use_cuda_graphs`. ``compile``: run the step through torch.compile (see the module
    docstring and :func:`use_compile`); a compiled step is static (on a CPU reading the ring's rows
    in use unless ``static=True`` asks for the masked ring)."""
    _check_arguments(model, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, generator, state,
                     compile)
    was_training = model.training
    model.eval()
    try:
        prompt = prompt.to(device=model.encoder.weight.device, dtype=torch.int64)
        device, batch = prompt.device, prompt.shape[1]
        hidden = mems = None
        if state is not None:
            hidden, mems = state.hidden, state.mems
        # Prefill: the whole prompt through the full-sequence path.
        h, hidden, mems = model(prompt, hidden=hidden, mems=mems, return_h=False)
        logits = model.decoder(h[-1])  # [B, V]
        steps = max_new_tokens if return_state else max_new_tokens - 1  # the state covers every token
        graphed = steps > 0 and use_cuda_graphs(device) if static is None else static
        masked = graphed or device.type != "cpu"
        compiling = use_compile(compile, device, steps, is_step_compiled(model, batch, device, masked))
        decoder = _Decoder(model, hidden, mems, static=graphed or compiling, masked=masked)
        step = _compile_step(model, decoder, batch, required=compile is True) if compiling else None
        if graphed and prompt.is_cuda:
            step = _GraphedStep(model, decoder, batch, run=step)
        elif step is None:
            def step(token):
                return _logits_step(model, decoder, token)
        out = [prompt]
        for n in range(max_new_tokens):
            token = choose_next(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
            out.append(token.unsqueeze(0))
            if on_token is not None:
                on_token(token)
            if n < steps:
                logits = step(token)
                decoder.advance()
        tokens = torch.cat(out)  # [T + max_new_tokens, B]
        if not return_state:
            return tokens
        hidden, mems = decoder.state()
        return tokens, GenerationState(hidden, mems, model_signature(model))
    finally:
        model.train(was_training)
