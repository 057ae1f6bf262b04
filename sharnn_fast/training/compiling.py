"""``sharnn train --compile``: the training step under torch.compile, compiled a bounded number of
times over the paper's random segment lengths and a growing memory.

What keeps the count bounded (docs: README, "Training"):

- The segment length T and the memory length M are marked dynamic on every call, so the first
  graph that sees them is already symbolic in both (torch.compile's default would compile the
  first shapes statically and only then generalise). Duck sizing is off while tracing: the second
  step's memory often has exactly the first segment's length (64 = 64), and duck sizing would
  specialise that graph to M == T.
- The memory is trimmed here, before the call, to the positions the model attends to
  (``num_max_positions - T``, what :meth:`SHARNN.forward` keeps): the graph then never meets the
  "memory longer than it keeps" case, which would be a graph of its own.
- Every op traces with symbolic sizes (the "torch" LSTM is one custom op; see
  ``ops/lstm/torch_native.py``).

What remains: the first step (no memory yet: a graph without attention over a memory), and on CPU
Inductor's choice of a more accurate float32 sum for reductions of more than 4096 rows (a guard on
B * (M + T)), so the tiny preset compiles three graphs in all and the paper's sizes two.

If torch.compile reaches its recompile limit anyway, :class:`RecompileLimitNotice` replaces
Dynamo's multi-line warning with one line that names the reason; the run continues (the frame runs
eagerly from then on, as torch.compile does).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx.experimental._config as fx_config

# The logger Dynamo's recompile-limit warning comes from.
_DYNAMO_LOGGER = "torch._dynamo.convert_frame"


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class RecompileLimitNotice(logging.Filter):
    """A filter for Dynamo's logger: its "hit config.recompile_limit" warning becomes one line
    passed to ``report`` (with the limit, the function and the last reason) and is not printed
    itself. Install with :meth:`install`, remove with :meth:`remove`."""

    def __init__(self, report: Callable[[str], None]):
        super().__init__()
        self.report = report
        self.hits = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("torch._dynamo hit config."):
            return True
        self.hits += 1
        lines = [line.strip() for line in message.splitlines()]
        limit = lines[0][len("torch._dynamo hit config."):]
        reason = next((line[len("last reason:"):].strip() for line in lines if line.startswith("last reason:")),
                      "unknown")
        self.report(f"torch.compile reached its recompile limit ({limit}); this step and later ones with "
                    f"new shapes run uncompiled. Last reason: {reason}. Every reason: run with "
                    "TORCH_LOGS=recompiles")
        return False

    def install(self) -> "RecompileLimitNotice":
        logging.getLogger(_DYNAMO_LOGGER).addFilter(self)
        return self

    def remove(self) -> None:
        logging.getLogger(_DYNAMO_LOGGER).removeFilter(self)


class CompiledStep:
    """``module`` (NextByteLoss, or DDP around it) under torch.compile, called as
    ``step(x, y, hidden, mems)`` with x, y [T, B] and mems as the model takes them.

    ``max_positions`` is the model's ``num_max_positions`` (the memory kept). :meth:`new_graphs`
    says which calls compiled a graph since it was last asked (for the trainer's one line each)."""

    def __init__(self, module: torch.nn.Module, max_positions: int):
        self.compiled = torch.compile(module)
        self.max_positions = max_positions
        self.graphs = 0  # compiled by this step so far
        self._new: list[tuple[int, int, int]] = []  # (graph number, T, M) not yet reported

    def __call__(self, x, y, hidden=None, mems=None):
        T = x.shape[0]
        if mems:
            keep = max(self.max_positions - T, 0)
            mems = [m[max(m.shape[0] - keep, 0):] if torch.is_tensor(m) else m for m in mems]
        for t in (x, y, *(m for m in mems or () if torch.is_tensor(m))):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        before = graphs_compiled()
        with fx_config.patch(use_duck_shape=False):
            out = self.compiled(x, y, hidden, mems)
        for _ in range(graphs_compiled() - before):
            self.graphs += 1
            memory = max((m.shape[0] for m in mems or () if torch.is_tensor(m)), default=0)
            self._new.append((self.graphs, T, memory))
        return out

    def new_graphs(self) -> list[tuple[int, int, int]]:
        """(graph number, segment length, memory length) of each graph compiled since the last
        call, and forgets them."""
        new, self._new = self._new, []
        return new
