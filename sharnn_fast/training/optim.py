"""Optimizers (LAMB with a minimum trust ratio, AdamW, SGD) and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("lamb", "adamw", "sgd")
# The published "minimum trust" LAMB clamps the weight norm at 10 in the trust ratio.
MAX_WEIGHT_NORM = 10.0
SCHEDULES = ("constant", "cosine")


class Lamb(torch.optim.Optimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", arXiv:1904.00962, Algorithm 2) in the "minimum trust" form the SHA-RNN paper trains
    with (Merity 2019, arXiv:1911.11423; its published main.py imports this variant): the weight
    norm clamped at 10 in the trust ratio, the ratio floored at 0.25, no bias correction.

    For each parameter w with gradient g, at every step:

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &= m / (\sqrt{v} + \epsilon) + \lambda w \\
        r &= \max(\min(\|w\|_2, c) / \|u\|_2,\ r_{min}) \ \text{if } \|w\|_2 > 0 \text{ and } \|u\|_2 > 0,
             \text{ else } 1 \\
        w &\leftarrow w - \eta\, r\, u

    with norms over the whole parameter tensor (the trust ratio r is per tensor), m and v starting
    at zero and no bias correction (the published recipe's choice). The clamp c = 10 matters at
    the paper's size: a LayerNorm gain of 1024 ones has norm 32, so without it the first step of
    most tensors would be 3 times larger. Parameters whose grad is None are skipped. The trust
    ratio stays on the parameter's device: a step never synchronises.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (2e-3 in the paper).
        betas: :math:`(\beta_1, \beta_2)`, default (0.9, 0.999).
        eps: :math:`\epsilon` added to :math:`\sqrt{v}`, default 1e-6.
        weight_decay: :math:`\lambda`, decoupled (added to the update, then trust-scaled), default 1.2e-6.
        min_trust: :math:`r_{min}`, the floor on the trust ratio, default 0.25 (the paper's).
        max_weight_norm: :math:`c`, the clamp on the weight norm in the trust ratio, default 10 (the
            paper's); ``math.inf`` turns it off (plain LAMB with a floor).
    Raises:
        ValueError: a negative lr, eps, weight_decay or min_trust, a max_weight_norm <= 0, or
            betas outside [0, 1).
    """

    def __init__(self, params, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 1.2e-6, min_trust: float = 0.25, max_weight_norm: float = MAX_WEIGHT_NORM):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("min_trust", min_trust)):
            if not 0.0 <= value < math.inf:
                raise ValueError(f"Lamb: {name} must be a finite number >= 0, got {value}")
        if not max_weight_norm > 0.0:
            raise ValueError(f"Lamb: max_weight_norm must be > 0, got {max_weight_norm}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"Lamb: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      min_trust=min_trust, max_weight_norm=max_weight_norm))

    def __setstate__(self, state):
        super().__setstate__(state)
        # A state_dict saved before the clamp existed (sharnn_fast 0.1) has no max_weight_norm in
        # its groups: it continues under the published rule (see training/checkpoint.py).
        for group in self.param_groups:
            group.setdefault("max_weight_norm", MAX_WEIGHT_NORM)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                clamped = weight_norm.clamp(max=group["max_weight_norm"])
                trust = torch.where((weight_norm > 0) & (update_norm > 0),
                                    (clamped / update_norm).clamp(min=group["min_trust"]),
                                    torch.ones_like(weight_norm))
                p.sub_(update.mul_(trust * group["lr"]))
        return loss


def build_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """"lamb" (the paper's: weight norm clamped at 10, minimum trust 0.25, eps 1e-6), "adamw" (betas 0.9, 0.999) or "sgd"
    (plain, no momentum, as the published script's "sgd")."""
    if name == "lamb":
        return Lamb(params, lr=lr, weight_decay=weight_decay, min_trust=0.25)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# The per-parameter state each optimizer's step reads, once the parameter has taken a step.
STATE_KEYS = {"lamb": ("exp_avg", "exp_avg_sq"), "adamw": ("step", "exp_avg", "exp_avg_sq"), "sgd": ()}


def optimizer_state_problem(name: str, optimizer: torch.optim.Optimizer) -> str | None:
    """What keeps ``optimizer`` (built by :func:`build_optimizer` as ``name``, then given a saved
    state_dict) from stepping, or None: a parameter group without one of the optimizer's settings
    (e.g. SGD's momentum in a LAMB state), a parameter's state without what ``name`` reads, or a
    state tensor whose shape is not its parameter's. torch's load_state_dict checks none of these;
    each would fail at the first step with a KeyError or a shape error."""
    fresh = build_optimizer(name, [torch.zeros(1, requires_grad=True)], lr=0.0, weight_decay=0.0)
    settings = set(fresh.param_groups[0]) - {"params"}  # what a group of this optimizer holds
    for i, group in enumerate(optimizer.param_groups):
        missing = sorted(settings - set(group))
        if missing:
            return f"parameter group {i} has no {', '.join(missing)}"
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            absent = [key for key in STATE_KEYS.get(name, ()) if state and key not in state]
            if absent:
                return f"the state of a parameter of shape {tuple(p.shape)} has no {', '.join(absent)}"
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step" and value.shape != p.shape:
                    return (f"{key} of a parameter of shape {tuple(p.shape)} has shape {tuple(value.shape)}")
    return None


def learning_rate(step: int, *, lr: float, warmup: int, schedule: str = "constant",
                  total_steps: int | None = None, epoch: int = 0, when: tuple = ()) -> float:
    """The learning rate of optimizer step ``step`` (counted from 1).

    Linear warmup: ``lr * step / warmup`` for the first ``warmup`` steps, as published. Then
    "constant" (the published schedule: the lr stays, divided by 10 after each epoch listed in
    ``when``, counted from 1, as the published script's --when; ``epoch`` counts from 0) or "cosine" (half a cosine from
    lr down to 0 at ``total_steps``).
    """
    if warmup > 0 and step < warmup:
        return lr * step / warmup
    rate = lr * 0.1 ** sum(1 for e in when if epoch + 1 > e)
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("the cosine schedule needs a known number of steps (--max-steps or --epochs)")
        done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        rate *= 0.5 * (1.0 + math.cos(math.pi * done))
    elif schedule != "constant":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return rate
