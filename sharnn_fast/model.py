"""SHA-RNN (Merity 2019), drop-in for the published ``model.SHARNN``.

Same constructor and forward arguments, return values, parameter names and shapes, initialisation
(with the same random seed, the same weights) and float32 numerics; see docs/model.md. The heavy
lifting goes through :mod:`sharnn_fast.ops`, so the backend decides how each op runs. Each block
also has a one-position ``step`` for decoding (plain PyTorch ops), which
:mod:`sharnn_fast.generation` builds its decoder from.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backend import preload, validate_backend
from .ops._dropout import keep_mask, keep_scale
from .ops._dtypes import at_least_float32  # where the published code calls .float(): never narrows float64
from .ops.boom.reference import gelu_sigmoid

LN_EPS = 1e-12


def _layer_norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=LN_EPS)


def _reject_keys_of_absent_child(module: nn.Module, child: str, state_dict, prefix: str,
                                 error_msgs: list, fix: str) -> None:
    """torch's loader treats a child set to None as absent and drops its keys without a word, even
    with strict=True; a checkpoint that has weights for it comes from another architecture."""
    if getattr(module, child) is not None:
        return
    keys = sorted(k for k in state_dict if k.startswith(f"{prefix}{child}."))
    if keys:
        error_msgs.append(f"the checkpoint has weights for {prefix}{child} ({', '.join(keys[:3])}"
                          f"{', ...' if len(keys) > 3 else ''}), which this model does not have; {fix}")


def _dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``. Under torch.compile, the mask comes from ``ops._dropout.keep_mask`` (16 random
    bits an element, about 3x faster on CPU than the uniform draw Inductor compiles for
    nn.Dropout); eager calls keep nn.Dropout's own random stream, the published model's."""
    if drop.training and drop.p > 0.0 and torch.compiler.is_compiling():
        return x * keep_mask(x, drop.p) * keep_scale(drop.p)
    return drop(x)


def _last_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t[-n:]`` (the last n rows, or all of them if fewer), written so that torch.compile keeps
    the length symbolic: slicing would guard on whether ``len(t) > n`` and compile a second graph
    once the memory is full."""
    start = torch.sym_max(t.shape[0] - n, 0)
    return t.narrow(0, start, t.shape[0] - start)


class Overparam(nn.Module):
    """The value gate's over-parameterisation: [c, f] = l1(z); sigmoid(f) * tanh(c)."""

    def __init__(self, nhid: int, device=None, dtype=None):
        super().__init__()
        self.l1 = nn.Linear(nhid, 2 * nhid, device=device, dtype=dtype)
        self.nhid = nhid

    def forward(self, z):
        c, f = self.l1(z).split(self.nhid, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class Attention(nn.Module):
    """The single head: learned sigmoid gates on q, k and v, a projected and normalised query."""

    def __init__(self, nhid: int, dropout: float):
        super().__init__()
        # Registration order matters: it fixes the order in which construction draws random
        # numbers, so a seed gives the same weights as the published model.
        self.qs = nn.Parameter(torch.zeros(1, 1, nhid))
        self.ks = nn.Parameter(torch.zeros(1, 1, nhid))
        self.vs = nn.Parameter(torch.zeros(1, 1, nhid))
        self.qkvs = nn.Parameter(torch.zeros(1, 3, nhid))  # unused; kept for checkpoints
        self.nhid = nhid
        self.drop = nn.Dropout(dropout)
        self.q = nn.Linear(nhid, nhid)
        self.qln = _layer_norm(nhid)
        self.r_gate = nn.Parameter(torch.ones(1, 1, nhid))  # unused; kept for checkpoints
        self.vq = Overparam(nhid)
        self.vq_collapsed = False

    def vq_collapse(self) -> None:
        """Fold the value gate into ``vs`` (``vs <- Overparam(sigmoid(vs))``) and drop ``vq``.

        For inference: outputs stay the same, one small matmul per call goes away.
        """
        if self.vq_collapsed:
            return
        with torch.no_grad():
            self.vs.copy_(self.vq(torch.sigmoid(self.vs)))
        self.vq = None
        self.vq_collapsed = True

    def gates(self):
        """The query, key and value gates, each [1, 1, d]: sigmoid(qs), sigmoid(ks) and
        overparam(sigmoid(vs)) (``vs`` itself once collapsed). They depend on the weights alone, so
        a decoder computes them once for all its steps (see :meth:`step`)."""
        value_gate = self.vs if self.vq_collapsed else self.vq(torch.sigmoid(self.vs))
        return torch.sigmoid(self.qs), torch.sigmoid(self.ks), value_gate

    def projected_query(self, h):
        """LayerNorm(q(h)) for positions h [..., d], the LayerNorm in at least float32, as
        published (it matters under autocast)."""
        return self.qln(at_least_float32(self.q(h)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Take the checkpoint's form of the value gate, so the loaded block computes what the
        checkpoint's block computed. Its keys say which form it is: ``vq.l1.*`` present means
        uncollapsed (``vs`` is the raw parameter); ``vs`` without them means collapsed (``vs`` is
        the gate itself). torch alone would drop ``vq.*`` into a collapsed block's ``vq = None``
        without a word, or read a collapsed ``vs`` as a raw one, and change the outputs."""
        vq_keys = [f"{prefix}vq.l1.weight", f"{prefix}vq.l1.bias"]
        present = [k in state_dict for k in vq_keys]
        if any(present) and not all(present):
            error_msgs.append(f"the checkpoint has {vq_keys[present.index(True)]} but not "
                              f"{vq_keys[present.index(False)]}: the value gate's Overparam layer is "
                              "incomplete, so the checkpoint is damaged")
        elif all(present) and self.vq_collapsed:
            warnings.warn(f"{prefix[:-1]}: the checkpoint's value gate is not collapsed, so this block "
                          "is un-collapsed to load it (call vq_collapse() again afterwards for "
                          "inference)", stacklevel=4)
            # Weights without an initialisation: the load fills them, and no random number is drawn.
            self.vq = nn.utils.skip_init(Overparam, self.nhid, device=self.vs.device,
                                         dtype=self.vs.dtype)
            self.vq_collapsed = False
        elif not any(present) and f"{prefix}vs" in state_dict and not self.vq_collapsed:
            warnings.warn(f"{prefix[:-1]}: the checkpoint comes from a block after vq_collapse() (it "
                          "has vs but no vq.l1.*), so this block is collapsed to load it: its vq "
                          "parameters are gone", stacklevel=4)
            self.vq = None
            self.vq_collapsed = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, query, key, value, backend: Optional[str] = None):
        query_gate, key_gate, value_gate = self.gates()
        q = query_gate * self.projected_query(query)
        k = key_gate * key
        v = value_gate * value
        q, v = _dropout(self.drop, q), _dropout(self.drop, v)
        return ops.attention(q, k, v, dropout_p=self.drop.p, training=self.training, backend=backend)

    def step(self, h, memory, mask=None, gates=None):
        """Attention of one new position per sequence, without dropout (for decoding).

        h: [B, d], the position's input (the query). memory: [M, B, d], the keys and values, this
        position's own among them, in any order (attention has no positional encoding). mask: [M]
        bool, True for the rows to leave out, or None. gates: :meth:`gates`, from a decoder that
        computes them once for all its steps; None computes them here. Returns [B, d].

        The key and value gates act on the query and the output, ``(q * kg) . m`` and
        ``vg * (P M)``, so the memory is never rescaled: the same result as :meth:`forward` with
        key = value = memory and the query last.
        """
        query_gate, key_gate, value_gate = self.gates() if gates is None else gates
        q = (query_gate * self.projected_query(h) * key_gate)[0]  # [B, d]
        scores = torch.einsum("bd,mbd->bm", q.to(memory.dtype), memory).float().div_(math.sqrt(q.shape[-1]))
        if mask is not None:
            scores.masked_fill_(mask, float("-inf"))
        weights = scores.softmax(-1).to(memory.dtype)  # [B, M]
        return (value_gate * torch.einsum("bm,mbd->bd", weights, memory))[0]


class Boom(nn.Module):
    """d -> F -> d feed-forward: GELU(x W^T + b) cut into F // d chunks that are summed."""

    def __init__(self, ninp: int, nhid: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(ninp, nhid)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, backend: Optional[str] = None):
        return ops.boom(x, self.linear1.weight, self.linear1.bias, dropout_p=self.dropout.p,
                        training=self.training, backend=backend)

    def step(self, x):
        """One position per sequence, without dropout (for decoding): x [B, d] -> [B, d], in
        plain PyTorch ops (a per-token call is too small to pay for a backend's dispatch)."""
        z = F.linear(x, self.linear1.weight, self.linear1.bias)  # [B, F]
        return gelu_sigmoid(z).unflatten(-1, (-1, x.shape[-1])).sum(-2)


class LSTMParameters(nn.Module):
    """The parameters of one LSTM layer, with nn.LSTM's names, shapes and default initialisation
    (uniform(-1/sqrt(H), 1/sqrt(H)), drawn in nn.LSTM's order). ops.lstm runs the recurrence.

    Not an nn.LSTM, which torch.compile refuses to trace even when only its parameters are used.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x, hx=None, backend: Optional[str] = None):
        """x [T, B, input_size]; hx (h0, c0) each [1, B, hidden_size] or None -> (y, (h_n, c_n))."""
        return ops.lstm(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0,
                        hx, backend=backend)

    def step(self, x, hx):
        """One time step: x [B, input_size]; hx (h, c) each [B, hidden_size] -> (h', c'), each
        [B, hidden_size] (``torch.lstm_cell``: one GEMM pair, the cell update fused)."""
        return torch.lstm_cell(x, hx, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class Block(nn.Module):
    """LSTM, then (in attention blocks) single-head attention over memory + current positions,
    then Boom; LayerNorms in front of each."""

    def __init__(self, ninp: int, nhid: int, dropout: float, use_attn: bool):
        super().__init__()
        self.attn = Attention(ninp, dropout) if use_attn else None
        self.ff = Boom(ninp, nhid, dropout)
        self.lnstart = _layer_norm(ninp)
        self.lnmid = _layer_norm(ninp)
        self.lnmem = _layer_norm(ninp)
        self.lnout = _layer_norm(ninp)  # unused; kept for checkpoints
        self.lnff = _layer_norm(ninp)
        self.lnxff = _layer_norm(ninp)
        self.drop = nn.Dropout(dropout)
        self.rnn = LSTMParameters(ninp, ninp)

    def forward(self, h, mem=None, hidden=None, backend: Optional[str] = None,
                max_positions: int = 5000):
        """h [T, B, d]; mem [M, B, d] or None; hidden (h0, c0) each [1, B, d] or None.

        Returns ``(h, new_mem, new_hidden, focus)``; new_mem is ``[]`` without attention, focus is
        always None (no backend materialises the attention weights).
        """
        x, new_hidden = self.rnn(self.lnstart(h), hidden, backend=backend)
        h = at_least_float32(_dropout(self.drop, x))  # no residual around the LSTM, as published

        new_mem = []
        if self.attn is not None:
            mh = self.lnmem(h)
            h = self.lnmid(h)
            bigh = mh if mem is None else torch.cat([mem, mh], dim=0)  # [M + T, B, d]
            new_mem = _last_rows(bigh, max_positions)
            h = h + _dropout(self.drop, self.attn(h, bigh, bigh, backend=backend))

        h = self.lnff(h) + _dropout(self.drop, self.ff(self.lnxff(h), backend=backend))
        return h, new_mem, new_hidden, None

    def step(self, x, hidden, memory=None, gates=None):
        """One position per sequence, without dropout (for decoding): the same computation as
        :meth:`forward` for T = 1.

        x: [B, d]; hidden: (h, c), each [B, d]. Attention blocks only: ``memory`` stores this
        position's memory row and says what to attend over, ``memory.append(row [B, d]) ->
        (keys [M, B, d], mask [M] bool or None)``, the keys including ``row``, the mask True for
        rows to leave out; ``gates``: ``self.attn.gates()`` computed once by the decoder, or None
        (see :meth:`Attention.step`). Returns ``(y [B, d], (h, c))``.
        """
        h, c = self.rnn.step(self.lnstart(x), hidden)
        y = at_least_float32(h)  # no residual around the LSTM, as published
        if self.attn is not None:
            keys, mask = memory.append(self.lnmem(y))
            y = self.lnmid(y)
            y = y + self.attn.step(y, keys, mask, gates)
        y = self.lnff(y) + self.ff.step(self.lnxff(y))
        return y, (h, c)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _reject_keys_of_absent_child(self, "attn", state_dict, prefix, error_msgs,
                                     "build the model with attn_layers= naming this block")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _resolve_attn_layers(attn_layers, nlayers: int) -> list[bool]:
    if attn_layers is None:
        chosen = {nlayers - 2} if nlayers >= 2 else set()
    elif attn_layers == "all":
        chosen = set(range(nlayers))
    else:
        try:
            chosen = {int(i) for i in attn_layers}
        except (TypeError, ValueError):
            raise TypeError(f"attn_layers must be None, 'all' or a sequence of block indices, "
                            f"got {attn_layers!r}") from None
        bad = sorted(i for i in chosen if not 0 <= i < nlayers)
        if bad:
            raise ValueError(f"attn_layers has indices {bad} outside 0 .. {nlayers - 1} (nlayers={nlayers})")
    return [i in chosen for i in range(nlayers)]


class SHARNN(nn.Module):
    """Single Headed Attention RNN. Drop-in for the published ``model.SHARNN``.

    ``rnn_type``, ``dropoute`` and ``wdrop`` are accepted and ignored, as published. Keyword-only
    extensions: ``attn_layers`` (``None``: the second-to-last block, as published; ``"all"``; or a
    sequence of block indices) and ``backend`` (``None`` follows :func:`sharnn_fast.set_backend`).

    Dtypes: float32 (the published numerics), float64 (``model.double()``: every backend that
    accepts float64 keeps it; "reference" and "torch" do) and bf16/fp16 under ``torch.autocast``.
    Where the published code calls ``.float()`` this model widens to at least float32 and never
    narrows float64.

    Dropout streams: with dropout in training, "reference" draws every mask through
    ``nn.Dropout``/``F.dropout`` in the published order, so with the same seed it repeats the
    published model's training run. The other backends draw the Boom and attention-weight masks
    their own way ("torch": 16 random bits per element of the Boom; "triton": Philox from a seed
    taken from torch's generator), so their masks differ from the published ones for the same seed:
    each element is still kept independently with probability 1 - p (to 2**-16 or better) and
    scaled by 1 / (1 - p), so the masks are statistically equivalent, not equal.

    Loading checkpoints: ``load_state_dict`` takes the checkpoint's form of each attention block's
    value gate, collapsed (no ``vq.l1.*`` keys) or not, so the loaded model computes what the
    checkpoint's model computed (with a warning when the block changes form). Weights for blocks
    this model has no attention in, or differing encoder and decoder matrices for a model with
    ``tie_weights=True``, raise an error (even with ``strict=False``) instead of being dropped.
    """

    def __init__(self, rnn_type, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout=0.5,
                 dropouth=0.5, dropouti=0.5, dropoute=0.1, wdrop=0, tie_weights=False, *,
                 attn_layers=None, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("ntoken", ntoken), ("ninp", ninp), ("nhid", nhid), ("nlayers", nlayers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if nhid % ninp != 0:
            raise ValueError(f"nhid must be a multiple of ninp: Boom sums nhid // ninp chunks of "
                             f"width ninp (the published code silently drops the remainder); got "
                             f"nhid={nhid}, ninp={ninp}")
        self.backend = backend
        self.ninp, self.nhid = ninp, nhid
        self.nlayers = nlayers
        self.num_max_positions = 5000
        self.num_heads = 1
        self.causal = True
        self.drop = nn.Dropout(dropout)
        self.idrop = nn.Dropout(dropouti)
        self.hdrop = nn.Dropout(dropouth)  # unused, as published

        self.blocks = nn.ModuleList(
            Block(ninp, nhid, dropouth, use_attn)
            for use_attn in _resolve_attn_layers(attn_layers, nlayers))
        self.encoder = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.apply(self._init_weights)

    @property
    def backend(self) -> Optional[str]:
        """The backend of every op of this model; None follows :func:`sharnn_fast.set_backend`."""
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = None if name is None else validate_backend(name)
        preload(self._backend)

    def _init_weights(self, module: nn.Module) -> None:
        # LayerNorms keep weight 1 and bias 0 (the published code's apex LayerNorm escapes its init
        # rule); the LSTM keeps nn.LSTM's default uniform initialisation.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.1 / math.sqrt(self.ninp))
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # With tie_weights=True both keys load into one Parameter and the last one wins: a
        # checkpoint whose two matrices differ cannot be reproduced by this model.
        enc, dec = state_dict.get(f"{prefix}encoder.weight"), state_dict.get(f"{prefix}decoder.weight")
        if (self.decoder.weight is self.encoder.weight and enc is not None and dec is not None
                and not torch.equal(enc, dec)):
            error_msgs.append("this model ties decoder.weight to encoder.weight (tie_weights=True), but "
                              "the checkpoint's two matrices differ; build the model with "
                              "tie_weights=False to load it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def generate(self, prompt, max_new_tokens, *, do_sample=True, temperature=1.0, top_k=None,
                 top_p=None, generator=None, state=None, return_state=False, compile=None):
        """Continue ``prompt`` by ``max_new_tokens`` tokens: a prefill of the prompt through the
        full-sequence path, then an incremental one-token decoder (see :mod:`sharnn_fast.generation`).

        Args:
            prompt: LongTensor [T, B] of token ids, sequence first like ``forward``; T >= 1.
            max_new_tokens: tokens to add, >= 0.
            do_sample: sample from the distribution (True) or take the argmax (False, greedy).
            temperature: > 0, however small (a tiny one tends to greedy); the logits are divided by
                it before sampling.
            top_k: keep only the k most likely tokens (None: all).
            top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
                reaches top_p, in (0, 1] (None: all).
            generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
            state: a :class:`~sharnn_fast.generation.GenerationState` from an earlier call with
                ``return_state=True``: the prompt then continues that text.
            return_state: also return the state after the last returned token.
            compile: run the one-token step through ``torch.compile`` (fixed shapes, compiled once
                per model, batch size, dtype, autocast state and device; logged as "compiled the
                decode step in S s"). None (default): only on a CPU, and only for at least
                :data:`sharnn_fast.generation.COMPILE_MIN_TOKENS` new tokens or when this step is
                compiled already; a compile that fails then logs one warning and decodes without
                it. True: always (on CUDA the CUDA graph replays the compiled step); a failed
                compile raises CompileError. False: never.

        Returns:
            LongTensor [T + max_new_tokens, B] (the prompt, then the new tokens), or
            ``(tokens, state)`` with ``return_state=True``.

        Runs under ``torch.no_grad()`` in eval mode (the mode is restored afterwards), on any backend
        and device, and under autocast. Sampling is in float32.

        Raises:
            TypeError / ValueError: an empty prompt, token ids outside the vocabulary, a
                non-integer prompt, ``max_new_tokens < 0``, ``temperature <= 0`` when sampling,
                ``top_p`` outside (0, 1], ``top_k < 1``, a state from another batch size or model,
                or ``compile`` other than None, True or False.
            sharnn_fast.generation.CompileError (a RuntimeError): ``compile=True`` and
                torch.compile could not compile the step.
        """
        from .generation import generate  # the model does not depend on generation at import

        return generate(self, prompt, max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, generator=generator, state=state,
                        return_state=return_state, compile=compile)

    def vq_collapse(self) -> None:
        """Collapse the value gate of every attention block (see :meth:`Attention.vq_collapse`)."""
        for block in self.blocks:
            if block.attn is not None:
                block.attn.vq_collapse()

    def forward(self, x, hidden=None, mems=None, padding_mask=None, return_h=True):
        """x: [T, B] token ids.

        hidden: one ``(h, c)`` per block, each [1, B, ninp] (from a previous call), or None.
        mems: one entry per block, [M, B, ninp] for attention blocks and ``[]``/``()``/None for the
            others (from a previous call), or None. Each is trimmed to its last 5000 - T positions.
        padding_mask: accepted and ignored, as in the published model.

        Returns ``(h, new_hidden, new_mems, None, None)``, or ``(h, new_hidden, new_mems)`` when
        ``return_h`` is False. h is the final hidden state [T, B, ninp]; logits are ``decoder(h)``.
        """
        T, B = self._check_tokens(x)
        if padding_mask is not None:
            warnings.warn("SHARNN ignores padding_mask, as the published model does", stacklevel=2)
        hidden = self._check_hidden(hidden, B)
        mems = self._check_mems(mems, B)
        backend = self.backend

        h = _dropout(self.idrop, self.encoder(x))  # [T, B, ninp]
        keep = max(self.num_max_positions - T, 0)  # memory positions attended to besides x's
        mems = [m[m.shape[0] - min(keep, m.shape[0]):] if torch.is_tensor(m) else None
                for m in mems or [None] * self.nlayers]

        new_hidden, new_mems = [], []
        for block, mem, hid in zip(self.blocks, mems, hidden or [None] * self.nlayers):
            h, new_mem, new_hid, _ = block(h, mem=mem, hidden=hid, backend=backend,
                                           max_positions=self.num_max_positions)
            new_hidden.append(new_hid)
            new_mems.append(new_mem)

        h = _dropout(self.drop, h)
        if return_h:
            return h, new_hidden, new_mems, None, None
        return h, new_hidden, new_mems

    # Argument checks: each names the argument and says what was expected.

    def _check_tokens(self, x) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of token ids [T, B], got {type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"x must hold integer token ids (torch.long or torch.int), got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must have shape [T, B] (sequence first), got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must have at least one time step and one sequence, got {list(x.shape)}")
        weight = self.encoder.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}")
        return x.shape[0], x.shape[1]

    def _check_state_tensor(self, name: str, t, B: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != self.ninp:
            raise ValueError(f"{name} must have shape [*, B, ninp={self.ninp}], got {list(t.shape)}")
        if t.shape[1] != B:
            raise ValueError(f"{name} has batch size {t.shape[1]} but x has batch size {B}")
        if t.device != self.encoder.weight.device:
            raise ValueError(f"{name} is on {t.device} but the model's parameters are on "
                             f"{self.encoder.weight.device}")

    def _check_hidden(self, hidden, B: int) -> Optional[Sequence]:
        if hidden is not None and not isinstance(hidden, (list, tuple)):
            raise TypeError(f"hidden must be a list or tuple of (h, c) pairs, got {type(hidden).__name__}")
        if not hidden:  # None or empty, as the published `if hidden` test
            return None
        if len(hidden) != self.nlayers:
            raise ValueError(f"hidden must have one (h, c) pair per block ({self.nlayers}), got {len(hidden)}")
        for i, pair in enumerate(hidden):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"hidden[{i}] must be an (h, c) pair, got {type(pair).__name__}")
            for j, t in enumerate(pair):
                self._check_state_tensor(f"hidden[{i}][{j}]", t, B)
                if t.shape[0] != 1:
                    raise ValueError(f"hidden[{i}][{j}] must have shape [1, B, ninp], got {list(t.shape)}")
        return hidden

    def _check_mems(self, mems, B: int) -> Optional[Sequence]:
        if mems is not None and not isinstance(mems, (list, tuple)):
            raise TypeError(f"mems must be a list or tuple with one entry per block, got {type(mems).__name__}")
        if not mems:  # None or empty: no memory, as the published `if mems` test
            return None
        if len(mems) != self.nlayers:
            raise ValueError(f"mems must have one entry per block ({self.nlayers}), got {len(mems)}")
        for i, (m, block) in enumerate(zip(mems, self.blocks)):
            if block.attn is None:
                continue  # the published blocks without attention ignore their memory ([] or ())
            if not torch.is_tensor(m):
                raise TypeError(f"mems[{i}] must be a tensor [M, B, ninp] for attention block {i}, "
                                f"got {type(m).__name__}")
            self._check_state_tensor(f"mems[{i}]", m, B)
        return mems
