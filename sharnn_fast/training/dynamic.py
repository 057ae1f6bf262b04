"""Dynamic evaluation: the model keeps adapting its weights to the text it has already scored.

Sources:
- B. Krause, E. Kahembwe, I. Murray, S. Renals, "Dynamic Evaluation of Neural Sequence Models",
  ICML 2018 (arXiv:1709.07432). Section 3: the scheme; section 4: the update rules below (the
  "RMS with a global prior" rule is theirs). Their published ``dynamiceval.py`` fixes how the
  constants scale (its README: "--oldhyper").
- B. Krause, E. Kahembwe, I. Murray, S. Renals, "Dynamic Evaluation of Transformer Language
  Models", arXiv:1904.08378 (2019): the same rule on Transformer-XL (enwik8: 0.99 to 0.94 bpc).

The split is cut into segments s_1, s_2, ... of ``bptt`` bytes, read in order with the hidden state
and attention memory carried across them as in static evaluation (truncated backpropagation: the
state is detached between segments). theta_0 = theta_g are the trained weights; for i = 1, 2, ...:
first s_i is **scored** with theta_{i-1} (its bytes count towards the bpc), then the gradient
g_i = grad L(s_i) of the segment's mean cross-entropy (over all columns, of all processes) at
theta_{i-1} takes one step:

    sgd (section 4, "global prior" decay on SGD):
        theta_i = theta_{i-1} - eta * g_i + lambda * (theta_g - theta_{i-1})
    rms (section 4, the paper's rule):
        theta_i = theta_{i-1} - eta * g_i / (sqrt(MS_g) + eps * m) + lambda * r * (theta_g - theta_{i-1})
        MS_g = (1 / N_b) * sum_k (grad L_k)^2  over N_b segments of training data, before evaluation
        m    = mean(sqrt(MS_g)),  r = min(sqrt(MS_g) / m, 1 / lambda)

all element-wise; the mean m is over every weight of the model, and the clip at 1 / lambda (from
the published code) keeps lambda * r <= 1, so the decay never overshoots theta_g. The paper adds a
constant epsilon to sqrt(MS_g); ours is eps * m, the same rule with epsilon given in units of the
model's own gradient scale, so that one default serves a tiny model and the paper's (a weight
whose training gradient was about 0, such as a byte's embedding that training never saw, would
otherwise take a step of eta * g / epsilon, and the evaluation can diverge). The training
gradients for MS_g come from the first N_b segments of the train split, cut and carried exactly as
the evaluated text is (same columns, same segment length), so that g_i / sqrt(MS_g) is about 1
per weight and eta is a step size in the weights' own units. Text is only ever learnt from after
it has been scored; the trained weights are restored when evaluation ends.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from . import distributed
from .data import BatchStream
from .errors import UserInputError
from .evaluation import score_segments
from .report import bits_per_byte

METHODS = ("rms", "sgd")
# Defaults. decay: the published dynamiceval.py's README settings (0.02 at 20-token segments).
# lr: the published rule's eta is tied to its own gradient scale (statistics at batch 100, eval
# at batch 1, mean over a segment of 5 words), so it does not carry over: ours were chosen on the
# tiny preset's valid split (docs in README.md, "Dynamic evaluation"). bptt: 128 bytes, about the
# 20 words of English the published README's faster setting adapts on, and never more than the
# checkpoint's own bptt.
DEFAULT_LR = {"rms": 5e-4, "sgd": 0.1}
DEFAULT_DECAY = 0.02
DEFAULT_BPTT = 128
DEFAULT_STATS_SEGMENTS = 100
DEFAULT_EPS = 0.1  # in units of mean(sqrt(MS_g)): see the module docstring


@dataclass(frozen=True)
class DynamicEval:
    """Settings of dynamic evaluation (see the module docstring for the rules and sources).

    method: "rms" (Krause et al. 2018, section 4; needs training data for MS_g) or "sgd".
    lr: eta >= 0, the step size (None: DEFAULT_LR[method]). 0 adapts nothing: the same bits as
        static evaluation (on a CPU in fp32), a control.
    decay: lambda in [0, 1], the pull back towards the trained weights (None: DEFAULT_DECAY).
    bptt: segment length in bytes, >= 1: one update per segment (None: min(128, the checkpoint's bptt)).
    stats_segments: N_b, training segments MS_g is averaged over (rms only).
    eps: > 0, eps * mean(sqrt(MS_g)) is added to sqrt(MS_g) (rms only).

    Raises UserInputError for a value outside these ranges.
    """

    method: str = "rms"
    lr: Optional[float] = None
    decay: Optional[float] = None
    bptt: Optional[int] = None
    stats_segments: int = DEFAULT_STATS_SEGMENTS
    eps: float = DEFAULT_EPS

    def __post_init__(self):
        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if self.method not in METHODS:
            raise UserInputError(f"dynamic evaluation method must be rms or sgd, got {self.method!r}")
        if self.lr is not None and not (number(self.lr) and self.lr >= 0):
            raise UserInputError(f"the dynamic evaluation learning rate must be a number >= 0, got {self.lr!r}")
        if self.decay is not None and not (number(self.decay) and 0 <= self.decay <= 1):
            raise UserInputError(f"the dynamic evaluation decay must be a number in [0, 1], got {self.decay!r}")
        if self.bptt is not None and not positive_int(self.bptt):
            raise UserInputError(f"the dynamic evaluation segment length (bptt) must be an integer >= 1, "
                                 f"got {self.bptt!r}")
        if not positive_int(self.stats_segments):
            raise UserInputError(f"stats_segments must be an integer >= 1, got {self.stats_segments!r}")
        if not (number(self.eps) and self.eps > 0):
            raise UserInputError(f"eps must be a number > 0, got {self.eps!r}")

    def resolved(self, checkpoint_bptt: int) -> "DynamicEval":
        """These settings with every None replaced by its default."""
        return replace(self, lr=DEFAULT_LR[self.method] if self.lr is None else self.lr,
                       decay=DEFAULT_DECAY if self.decay is None else self.decay,
                       bptt=min(DEFAULT_BPTT, checkpoint_bptt) if self.bptt is None else self.bptt)

    def to_dict(self) -> dict:
        return asdict(self)


class SquaredGradients(torch.optim.Optimizer):
    """Not an optimizer: step() adds each parameter's squared gradient to a running sum (float32),
    so that torch.amp.GradScaler can unscale the gradients and skip an overflowing step for it.
    mean_squares() -> the list of MS_g tensors, in parameter order."""

    def __init__(self, params):
        super().__init__(params, {})
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros_like(p, dtype=torch.float32)
                if p.grad is not None:
                    state["sum"].addcmul_(p.grad, p.grad)
        self.steps += 1
        return True

    def mean_squares(self) -> list:
        return [self.state[p]["sum"] / self.steps for group in self.param_groups for p in group["params"]]


class DynamicUpdate(torch.optim.Optimizer):
    """The update rules of Krause et al. 2018, section 4 (module docstring): "sgd" when
    ``mean_squares`` is None, else "rms" with MS_g = ``mean_squares`` (one float32 tensor per
    parameter, in order). Remembers the weights it starts from as theta_g; restore() puts them back.
    step() returns True (torch.amp.GradScaler.step returns None for a step it skipped)."""

    def __init__(self, params, *, lr: float, decay: float, mean_squares: Optional[list] = None,
                 eps: float = DEFAULT_EPS):
        super().__init__(params, dict(lr=lr, decay=decay))
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            self.state[p]["origin"] = p.detach().clone()
        if mean_squares is not None:
            roots = [ms.sqrt() for ms in mean_squares]
            mean = sum(r.sum() for r in roots) / sum(r.numel() for r in roots)
            for p, root in zip(params, roots):
                self.state[p]["denominator"] = root + eps * mean
                if decay > 0:
                    self.state[p]["rate"] = (root / mean).clamp(max=1 / decay)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay = group["lr"], group["decay"]
            for p in group["params"]:
                state = self.state[p]
                pull = None
                if decay > 0:  # lambda (* r) * (theta_g - theta), from theta_{i-1}
                    pull = (state["origin"] - p).mul_(decay)
                    if "rate" in state:
                        pull.mul_(state["rate"])
                if p.grad is not None:
                    if "denominator" in state:
                        p.addcdiv_(p.grad, state["denominator"], value=-lr)
                    else:
                        p.add_(p.grad, alpha=-lr)
                if pull is not None:
                    p.add_(pull)
        return True

    @torch.no_grad()
    def restore(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.copy_(self.state[p]["origin"])
                p.grad = None


class GradientStep:
    """adapt(loss) for :func:`~.evaluation.score_segments`: backward of ``loss`` (this rank's share),
    the gradients summed over the processes, then ``optimizer.step()``; under fp16 through a
    torch.amp.GradScaler, which skips a step whose gradients overflow (counted in ``skipped``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler, ctx: distributed.Context):
        self.optimizer, self.scaler, self.ctx = optimizer, scaler, ctx
        self.steps = self.skipped = 0

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.ctx.enabled:  # the gradient of the mean over all processes' columns, on every rank
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    distributed.all_reduce(p.grad, self.ctx)
        self.steps += 1
        if self.scaler is None:
            self.optimizer.step()
            return
        if self.scaler.step(self.optimizer) is None:
            self.skipped += 1
        self.scaler.update()


def evaluate_dynamic(model, stream: BatchStream, dynamic: DynamicEval, *, bptt: int,
                     stats_stream: Optional[BatchStream] = None, precision: str = "fp32",
                     ctx: Optional[distributed.Context] = None, progress: bool = False,
                     keep_losses: bool = False) -> dict:
    """Dynamic evaluation of ``model`` on ``stream`` (module docstring: the rules and sources).

    bptt: the checkpoint's, for the default segment length. stats_stream: the training data MS_g
    is collected on (needed by "rms"), cut into the same columns as ``stream``. precision: "fp32",
    "bf16" or "fp16" autocast; fp16 scales the loss (torch.amp.GradScaler, as training does) and
    skips an update whose gradients overflow (the segment is still scored). Under torchrun the
    gradients are summed over the processes (torch.distributed), so any number of processes
    adapts as one would. The model runs in eval mode (no dropout) with its graph built for the
    step; its weights are the trained ones again when this returns (or raises).

    Returns ``{"loss": nats per byte, "bpc", "tokens": bytes scored (all processes), "seconds"
    and "tokens_per_s" of the scoring and adapting pass, "stats_seconds", "stats_segments" (N_b
    used), "updates", "skipped_updates", "method", "lr", "decay", "bptt", "eps"}``, and with
    ``keep_losses`` "losses": [positions, B] float32 nats of this process's columns.

    Raises UserInputError: "rms" without ``stats_stream``, or no training segment whose gradient
    was finite.
    """
    settings = dynamic.resolved(bptt)
    device = model.decoder.weight.device
    ctx = ctx or distributed.Context(rank=0, world_size=1, local_rank=0, device=device)
    if settings.method == "rms" and stats_stream is None:
        raise UserInputError("dynamic evaluation with the rms method needs training data for its gradient "
                             "statistics (stats_stream); or use method='sgd'")
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    mean_squares, stats_seconds, stats_used = None, 0.0, 0
    if settings.method == "rms":
        squares = SquaredGradients(params)
        collect = GradientStep(squares, scaler, ctx)
        try:
            stats = score_segments(model, stats_stream, bptt=settings.bptt, precision=precision, ctx=ctx,
                                   adapt=collect, max_segments=settings.stats_segments,
                                   progress="gradient statistics" if progress else None)
        finally:
            for p in params:
                p.grad = None
        stats_seconds, stats_used = stats["seconds"], collect.steps - collect.skipped
        if stats_used == 0:
            raise UserInputError(f"every one of the {collect.steps} training segments for the rms statistics "
                                 f"overflowed in {precision}: try --precision bf16 or fp32")
        mean_squares = squares.mean_squares()
    update = DynamicUpdate(params, lr=settings.lr, decay=settings.decay, mean_squares=mean_squares, eps=settings.eps)
    adapt = GradientStep(update, scaler, ctx)
    try:
        result = score_segments(model, stream, bptt=settings.bptt, precision=precision, ctx=ctx, adapt=adapt,
                                keep_losses=keep_losses, progress="dynamic evaluation" if progress else None)
    finally:
        update.restore()
    result.update(settings.to_dict(), bpc=bits_per_byte(result["loss"]),
                  tokens_per_s=result["tokens"] / max(result["seconds"], 1e-9), stats_seconds=stats_seconds,
                  stats_segments=stats_used if settings.method == "rms" else 0, updates=adapt.steps,
                  skipped_updates=adapt.skipped)
    return result
