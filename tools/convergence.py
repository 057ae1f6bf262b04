"""Convergence check on real text: train a small SHARNN with two backends from the same seed on
the same bytes and compare the loss curves.

    python tools/convergence.py                       # CPU, float32, "reference" vs "auto"
    python tools/convergence.py --device cuda --dtype bfloat16 --steps 400

Text: the docstrings of this Python's standard library (English prose written by people, about
3 MB, generated on the fly, so nothing is downloaded and nothing large is committed), read as bytes
like enwik8. Training follows the paper's recipe scaled down (shared/SPEC.md): LAMB with a minimum
trust ratio of 0.25, linear warmup, gradient clipping at 0.25, sequence lengths drawn around bptt,
hidden state and memory carried (detached) from segment to segment. Dropout is off, so the two
curves differ only by the backends' rounding. Writes a JSON and a PNG plot to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import math
import pkgutil
import platform
import random
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sharnn_fast

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# Modules whose import has side effects (opening a browser, printing, GUI toolkits) or is slow.
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
                   "test", "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "xxsubtype"}


def stdlib_docstrings(max_bytes: int) -> bytes:
    """Docstrings of the standard library's top-level modules and their public classes and
    functions, in sorted module order, de-duplicated: deterministic for a given Python version."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in SKIPPED_MODULES)
    seen, texts, size = set(), [], 0
    for name in names:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(None):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific or broken modules are simply left out
            continue
        members = [module] + [obj for attr, obj in sorted(vars(module).items())
                              if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == name]
        for obj in members:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
                size += len(doc) + 2
        if size >= max_bytes:
            break
    return "\n\n".join(texts).encode("utf-8")[:max_bytes]


def unigram_entropy_nats(data: torch.Tensor) -> float:
    p = torch.bincount(data, minlength=256).double() / data.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


class Lamb(torch.optim.Optimizer):
    """LAMB as in the paper's recipe: Adam moments without bias correction, the update scaled per
    parameter by the trust ratio ||w|| / ||update||, floored at `min_trust`."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1.2e-6, min_trust=0.25):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_trust=min_trust))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), update.norm()
                trust = (w_norm / u_norm).clamp(min=group["min_trust"]) if w_norm > 0 and u_norm > 0 else 1.0
                p.add_(update, alpha=-group["lr"] * float(trust))


def segment_lengths(bptt: int, seed: int):
    """The paper's sequence lengths: bptt (p 0.95) or bptt / 2, then Normal(that, 5), in [5, bptt]."""
    rng = random.Random(seed)
    while True:
        base = bptt if rng.random() < 0.95 else bptt / 2
        yield max(5, min(bptt, int(rng.gauss(base, 5))))


def train(backend: str, data: torch.Tensor, *, steps: int, device: str, dtype: torch.dtype, seed: int = 0,
          ninp: int = 128, nhid: int = 512, nlayers: int = 2, bptt: int = 64, batch: int = 16,
          lr: float = 2e-3, warmup: int = 50) -> list[float]:
    """Train for `steps` segments; returns the training loss (nats per byte) of each."""
    torch.manual_seed(seed)
    model = sharnn_fast.SHARNN("LSTM", 256, ninp, nhid, nlayers, dropout=0.0, dropouth=0.0,
                               dropouti=0.0, backend=backend).to(device).train()
    optimizer = Lamb(model.parameters(), lr=lr)
    streams = data[: data.numel() // batch * batch].view(batch, -1).t().contiguous().to(device)  # [N, B]
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    hidden, mems, position, losses = None, None, 0, []
    for step, length in zip(range(steps), segment_lengths(bptt, seed)):
        if position + length + 1 > streams.shape[0]:
            position, hidden, mems = 0, None, None
        x, y = streams[position:position + length], streams[position + 1:position + length + 1]
        position += length
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        with autocast:
            h, hidden, mems, _, _ = model(x, hidden=hidden, mems=mems)
            logits = model.decoder(h)
        loss = F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        hidden = [(hh.detach(), cc.detach()) for hh, cc in hidden]
        mems = [m.detach() if torch.is_tensor(m) else [] for m in mems]
        losses.append(loss.item())
    return losses


def plot(curves: dict, unigram: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), [dict(lw=3, alpha=0.45), dict(lw=1, ls="--")]):
        ax.plot([l / math.log(2) for l in losses], label=name, **style)  # the second drawn over the first
    ax.axhline(unigram / math.log(2), color="k", ls="--", lw=0.8, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (bits per byte)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backends", nargs=2, default=["reference", "auto"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--bytes", type=int, default=400_000, help="size of the text")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    data = torch.tensor(list(stdlib_docstrings(args.bytes)), dtype=torch.long)
    unigram = unigram_entropy_nats(data)
    curves = {name: train(name, data, steps=args.steps, device=args.device, dtype=dtype)
              for name in args.backends}
    a, b = curves.values()
    tail = slice(-max(1, args.steps // 10), None)
    summary = dict(
        text=f"docstrings of the Python {platform.python_version()} standard library, {data.numel()} bytes",
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}",
        dtype=args.dtype, steps=args.steps, torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        unigram_entropy_bits=unigram / math.log(2),
        final_loss_bits={n: sum(c[tail]) / len(c[tail]) / math.log(2) for n, c in curves.items()},
        max_abs_loss_difference_nats=max(abs(x - y) for x, y in zip(a, b)),
        curves=curves)
    stem = RESULTS_DIR / f"convergence_{re.sub(r'[^A-Za-z0-9]+', '-', summary['device']).lower()}_{args.dtype}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))
    try:
        plot(curves, unigram, f"{summary['text']}; {summary['device']}, {args.dtype}", stem.with_suffix(".png"))
        print(f"wrote {stem}.json and .png")
    except ImportError as err:
        print(f"wrote {stem}.json; no plot ({err}: pip install matplotlib)")


if __name__ == "__main__":
    main()
