"""Text generation with SHARNN: a prefill of the prompt through the full-sequence path, then an
incremental per-token decoder, and the standard sampling rules (temperature, top-k, top-p).

Prefill runs ``model(prompt, hidden, mems)``, so it uses the model's backend (the fused kernels
where they run). Decode is one token per step, through plain PyTorch ops on preallocated state:

- **LSTM**: one ``torch.lstm_cell`` per block (one GEMM pair, the cell update fused by ATen).
- **Attention**: each attention block keeps its memory, ``lnmem`` of its input at every position,
  in a buffer of ``model.num_max_positions`` (5000) rows that is written as a ring. Appending a
  token writes one row; once the buffer is full, the new row overwrites the oldest, which is
  exactly the model's rule (the current token plus the last 4999 memory positions). Attention has
  no positional encoding, so the keys' order in the ring does not change the result. The key and
  value gates are folded into the query and the output, ``(q * kg) . m`` and ``vg * (P M)``, so the
  memory is never rescaled per token.
- **Boom**: one GEMM and the GELU chunk sum, on the one token.

No memory is concatenated per token: the published per-token loop does a ``torch.cat`` of up to
5000 x d per attention block per token.

Sampling follows the usual definitions: logits divided by the temperature, then top-k (keep the k
largest logits) and top-p ("nucleus", Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", section 3.1: keep the smallest set of most likely tokens whose probability reaches
p), renormalised, all in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from . import _env


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
class _Decoder:
    """The model's state for one-token steps: (h, c) per block and a ring-buffer memory per
    attention block, built from a (hidden, mems) pair as model.forward returns them (copied: the
    caller's tensors are never written).

    ``filled`` and ``head`` (rows in use, next row to write) describe the state before the next
    step; :meth:`advance` moves them on after each step. With ``static=True`` every tensor keeps
    its shape and address from step to step, as a CUDA graph needs: the step writes the ring
    through device-side copies of the two counters and attends over all of the ring with the
    unused rows masked, instead of over a slice whose length changes.
    """

    def __init__(self, model, hidden, mems, static: bool = False):
        self.model, self.static = model, static
        self.cap = model.num_max_positions
        self.h = [pair[0][0].clone() for pair in hidden]  # each [B, d]
        self.c = [pair[1][0].clone() for pair in hidden]  # each [B, d]
        self.ring, self.filled, self.head = [], [], []
        for block, mem in zip(model.blocks, mems):
            if block.attn is None:
                self.ring.append(None)
                self.filled.append(0)
                self.head.append(0)
                continue
            mem = mem[-self.cap:]
            ring = mem.new_zeros(self.cap, *mem.shape[1:])  # [cap, B, d]
            ring[:mem.shape[0]] = mem
            self.ring.append(ring)
            self.filled.append(mem.shape[0])
            self.head.append(mem.shape[0] % self.cap)
        if static:
            device = model.encoder.weight.device
            self.rows = torch.arange(self.cap, device=device)  # [cap]
            self.head_t = [torch.tensor([n], device=device) for n in self.head]  # each [1]
            self.filled_t = [torch.tensor([n], device=device) for n in self.filled]  # each [1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Read one token per sequence (token [B]) and return the model's output h [B, d]."""
        model = self.model
        h = model.encoder(token)  # [B, d]
        for i, block in enumerate(model.blocks):
            rnn = block.rnn
            h_new, c_new = torch.lstm_cell(block.lnstart(h), (self.h[i], self.c[i]), rnn.weight_ih_l0,
                                           rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            if self.static:
                self.h[i].copy_(h_new)
                self.c[i].copy_(c_new)
            else:
                self.h[i], self.c[i] = h_new, c_new
            h = h_new.to(torch.promote_types(h_new.dtype, torch.float32))  # the model's widening
            if block.attn is not None:
                memory_row = block.lnmem(h)
                h = block.lnmid(h)
                h = h + self._attend(i, block.attn, h, memory_row)
            h = block.lnff(h) + _boom_one_token(block.ff.linear1, block.lnxff(h))
        return h

    def advance(self) -> None:
        """After a step: one more position in every attention block's memory."""
        for i, ring in enumerate(self.ring):
            if ring is not None:
                self.head[i] = (self.head[i] + 1) % self.cap
                self.filled[i] = min(self.filled[i] + 1, self.cap)

    def _attend(self, i: int, attn, h, memory_row):
        """Attention block i for the one new position, query h [B, d]: the keys and values are the
        memory plus ``memory_row`` [B, d] (this position's lnmem), written to the ring first."""
        ring = self.ring[i]
        mask = None
        if self.static:
            ring.index_copy_(0, self.head_t[i], memory_row.to(ring.dtype).unsqueeze(0))
            filled = self.filled_t[i].add_(1).clamp_(max=self.cap)
            self.head_t[i].add_(1).remainder_(self.cap)
            memory, mask = ring, self.rows >= filled  # [cap, B, d], [cap]: rows not in use
        else:
            ring[self.head[i]] = memory_row.to(ring.dtype)
            memory = ring[:min(self.filled[i] + 1, self.cap)]  # [M, B, d], rows in ring order
        query = attn.qln(attn.q(h).to(torch.promote_types(h.dtype, torch.float32)))
        q = torch.sigmoid(attn.qs[0]) * query * torch.sigmoid(attn.ks[0])  # [B, d]: key gate folded in
        scores = torch.einsum("bd,mbd->bm", q.to(memory.dtype), memory).float() / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = scores.softmax(-1).to(memory.dtype)  # [B, M]
        return attn.value_gate()[0] * torch.einsum("bm,mbd->bd", weights, memory)

    def tensors(self) -> list:
        """Every tensor a step writes (for saving and restoring around CUDA-graph warm-up)."""
        rings = [r for r in self.ring if r is not None]
        counters = self.head_t + self.filled_t if self.static else []
        return self.h + self.c + rings + counters

    def state(self) -> tuple[list, list]:
        """(hidden, mems) in model.forward's format, memories oldest first."""
        hidden = [(h.unsqueeze(0).clone(), c.unsqueeze(0).clone()) for h, c in zip(self.h, self.c)]
        mems = []
        for ring, filled, head in zip(self.ring, self.filled, self.head):
            if ring is None:
                mems.append([])
            elif filled < self.cap:
                mems.append(ring[:filled].clone())
            else:
                mems.append(torch.cat([ring[head:], ring[:head]]))
        return hidden, mems


class _GraphedStep:
    """The one-token step (decoder step and logits) captured once in a CUDA graph and replayed:
    one launch per token instead of a few dozen. Inputs and outputs are static buffers."""

    WARMUP_STEPS = 2  # eager steps on a side stream before capture (cuBLAS handles, allocator)

    def __init__(self, model, decoder: _Decoder, batch: int):
        device = model.encoder.weight.device
        self.token = torch.zeros(batch, dtype=torch.int64, device=device)  # [B]
        saved = [t.clone() for t in decoder.tensors()]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                model.decoder(decoder.step(self.token))
        torch.cuda.current_stream(device).wait_stream(side)
        for t, copy in zip(decoder.tensors(), saved):  # the warm-up steps must leave no trace
            t.copy_(copy)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decoder(decoder.step(self.token))  # [B, V]

    def __call__(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


def use_cuda_graphs(device: torch.device) -> bool:
    """``SHARNN_GENERATE_CUDA_GRAPHS``: ``auto`` (default: on CUDA), ``0`` (never) or ``1``."""
    setting = _env.choice("SHARNN_GENERATE_CUDA_GRAPHS")  # ValueError for another value
    return device.type == "cuda" and setting != "0"


def _boom_one_token(linear, x):
    """The Boom of one position per sequence (eval mode): GELU(x W^T + b) chunks summed; x [B, d]."""
    z = F.linear(x, linear.weight, linear.bias)  # [B, F]
    return (z * torch.sigmoid(1.702 * z)).unflatten(-1, (-1, x.shape[-1])).sum(-2)


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------
def _check_arguments(model, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, generator,
                     state):
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


@torch.no_grad()
def generate(model, prompt, max_new_tokens, *, do_sample=True, temperature=1.0, top_k=None, top_p=None,
             generator=None, state=None, return_state=False, on_token=None, static=None):
    """See :meth:`sharnn_fast.SHARNN.generate`. ``on_token(tokens [B])``, if given, is called with
    every new token as soon as it is chosen (for streaming). ``static``: decode with fixed-shape
    tensors (replayed from a CUDA graph on CUDA); None decides by :func:`use_cuda_graphs`."""
    _check_arguments(model, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, generator, state)
    was_training = model.training
    model.eval()
    try:
        prompt = prompt.to(device=model.encoder.weight.device, dtype=torch.int64)
        hidden = mems = None
        if state is not None:
            hidden, mems = state.hidden, state.mems
        # Prefill: the whole prompt through the full-sequence path.
        h, hidden, mems = model(prompt, hidden=hidden, mems=mems, return_h=False)
        logits = model.decoder(h[-1])  # [B, V]
        steps = max_new_tokens if return_state else max_new_tokens - 1  # the state covers every token
        graphed = steps > 0 and use_cuda_graphs(prompt.device) if static is None else static
        decoder = _Decoder(model, hidden, mems, static=graphed)
        if graphed and prompt.is_cuda:
            step = _GraphedStep(model, decoder, prompt.shape[1])
        else:
            def step(token):
                return model.decoder(decoder.step(token))
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


def generate_text(checkpoint, prompt: bytes, out, *, max_new_tokens=200, do_sample=True, temperature=1.0,
                  top_k=None, top_p=None, seed=None, device=None, precision="fp32", backend=None) -> bytes:
    """``sharnn generate``: continue the bytes ``prompt`` with the byte-level model of a
    ``sharnn train`` checkpoint, writing the new bytes to the text stream ``out`` as they come
    (decoded as UTF-8, invalid sequences replaced). Returns the new bytes.

    device: default CUDA if available, else CPU. precision: "fp32", or "bf16"/"fp16" autocast.
    backend: None is the checkpoint's where it runs, else auto (see :func:`sharnn_fast.load_checkpoint`).
    Raises the errors of :func:`sharnn_fast.load_checkpoint` and :meth:`SHARNN.generate`.
    """
    import codecs
    import contextlib

    from .training.checkpoint import load_checkpoint
    from .training.distributed import resolve_device

    if not prompt:
        raise ValueError("the prompt is empty: give at least one byte")
    device = resolve_device(device)
    model, _ = load_checkpoint(checkpoint, map_location=device, backend=backend)
    if model.encoder.num_embeddings != 256:
        raise ValueError(f"{checkpoint}: a byte-level model has 256 tokens, this one has "
                         f"{model.encoder.num_embeddings}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
    autocast = (torch.autocast(device.type, dtype=dtypes[precision]) if dtypes[precision] is not None
                else contextlib.nullcontext())
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new = bytearray()

    def stream(token):
        byte = int(token[0])
        new.append(byte)
        out.write(decoder.decode(bytes([byte])))
        out.flush()

    tokens = torch.tensor(list(prompt), dtype=torch.int64, device=device).unsqueeze(1)  # [T, 1]
    with autocast:
        generate(model, tokens, max_new_tokens, do_sample=do_sample, temperature=temperature,
                 top_k=top_k, top_p=top_p, generator=generator, on_token=stream)
    out.write(decoder.decode(b"", final=True))
    out.flush()
    return bytes(new)
