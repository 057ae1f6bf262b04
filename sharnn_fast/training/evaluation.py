"""Scoring a split: bits per byte of the next byte, segment by segment, with the hidden state and
the attention memory carried across the whole split as the published evaluate does (Merity 2019,
arXiv:1911.11423; its published training script). The one loop behind validation during training
(:mod:`.loop`), ``sharnn eval`` and dynamic evaluation (:mod:`.dynamic`, which adapts the weights
between segments through ``adapt``). bpc = nats / ln 2.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from . import distributed
from .config import autocast_context
from .data import BatchStream
from .report import progress_bar


def detached(hidden, mems):
    """The recurrent state (hidden: [(h, c)] per layer; mems: a tensor or [] per block) cut from
    the autograd graph: what truncated backpropagation through time carries to the next segment."""
    return ([(h.detach(), c.detach()) for h, c in hidden],
            [m.detach() if torch.is_tensor(m) else [] for m in mems])


def score_segments(model, stream: BatchStream, *, bptt: int, precision: str = "fp32",
                   ctx: Optional[distributed.Context] = None, adapt=None, max_segments: Optional[int] = None,
                   keep_losses: bool = False, progress: Optional[str] = None) -> dict:
    """Score a split segment by segment, in order, with the state (hidden and attention memory)
    carried across the whole split as the published evaluate does; the model in eval mode (no
    dropout). The one loop behind static and dynamic evaluation (:mod:`.dynamic`).

    Segments of ``bptt`` bytes (the last one shorter), at most ``max_segments`` of them. Each is
    scored first; then, when ``adapt`` is given, the forward graph is kept and ``adapt(loss)`` is
    called with the segment's mean loss over all processes' columns (a 0-dim float32 tensor whose
    backward gives this rank's share of the gradient), so that an update only ever follows the
    scoring of the text it learns from. Without ``adapt`` no graph is built.

    Returns ``{"loss": mean nats per byte (all ranks), "tokens": bytes scored (all ranks),
    "seconds", "losses": [positions, B] float32 nats of this rank's columns on the CPU (only with
    keep_losses)}``. ``progress``: a tqdm bar with this description on rank 0 when stderr is a
    terminal. bpc = loss / ln 2."""
    device = model.decoder.weight.device
    ctx = ctx or distributed.Context(rank=0, world_size=1, local_rank=0, device=device)
    was_training = model.training
    model.eval()
    columns = int(distributed.all_reduce(torch.tensor(stream.batch_size, device=ctx.device), ctx).item())
    starts = range(0, stream.length - 1, bptt)[:max_segments]
    bar = progress_bar(progress, total=columns * (min(stream.length - 1, len(starts) * bptt)),
                       enabled=progress is not None and ctx.is_main)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    kept = []
    hidden = mems = None
    started = time.perf_counter()
    try:
        for position in starts:
            x, y = stream.segment(position, bptt, device)
            with torch.set_grad_enabled(adapt is not None):
                with autocast_context(device, precision):
                    h, hidden, mems, _, _ = model(x, hidden=hidden, mems=mems)
                    logits = model.decoder(h)  # [T, B, V]
                nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
                segment_total = nats.sum()
            total += segment_total.detach()
            count += y.numel()
            if keep_losses:
                kept.append(nats.detach().view(y.shape).cpu())
            if adapt is not None:
                adapt(segment_total / (y.size(0) * columns))
                hidden, mems = detached(hidden, mems)
            bar.update(y.size(0) * columns)
    finally:
        bar.close()
        model.train(was_training)
    if ctx.enabled:
        summed = distributed.all_reduce(torch.stack([total, total.new_tensor(count)]), ctx)
        total, count = summed[0], int(summed[1].item())
    result = dict(loss=total.item() / count, tokens=count, seconds=time.perf_counter() - started)
    if keep_losses:
        result["losses"] = torch.cat(kept)
    return result


def evaluate(model, stream: BatchStream, *, bptt: int, precision: str = "fp32",
             ctx: Optional[distributed.Context] = None) -> tuple[float, int]:
    """Mean cross-entropy (nats per byte) of the next byte over a whole split, and the number of
    bytes predicted (all ranks). Segments of ``bptt`` bytes, state (hidden and memory) carried
    across the whole split as the published evaluate does, model in eval mode (no dropout).
    Every column contributes its ``length - 1`` predictions. bpc = loss / ln 2. Dynamic
    evaluation: :func:`sharnn_fast.training.dynamic.evaluate_dynamic`."""
    result = score_segments(model, stream, bptt=bptt, precision=precision, ctx=ctx)
    return result["loss"], result["tokens"]
