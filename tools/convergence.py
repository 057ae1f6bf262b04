"""Convergence check on real text: train a small SHARNN with two backends from the same seed on
the same bytes and compare the loss curves.

    python tools/convergence.py                       # CPU, float32, "reference" vs "auto"
    python tools/convergence.py --device cuda --dtype bfloat16 --steps 400

Text: the docstrings of this Python's standard library (English prose written by people, about
480 KB on Python 3.11, generated on the fly, so nothing is downloaded and nothing large is
committed; the embedded corpus of `sharnn train`), read as bytes like enwik8. Training follows the
paper's recipe scaled down (docs/model.md) with the package's own pieces: LAMB as published (weight
norm clamped at 10 in the trust ratio, minimum trust ratio 0.25), linear warmup, gradient clipping at 0.25, sequence lengths drawn around bptt,
hidden state and memory carried (detached) from segment to segment. Dropout is off, so the two
curves differ only by the backends' rounding. Writes a JSON and a PNG plot to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F

import sharnn_fast
from sharnn_fast._files import write_atomically
# The package's own recipe pieces, the ones `sharnn train` uses: the corpus, LAMB, the lengths.
from sharnn_fast.training.data import stdlib_docstrings
from sharnn_fast.training.loop import draw_sequence_length
from sharnn_fast.training.optim import Lamb

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def unigram_entropy_nats(data: torch.Tensor) -> float:
    p = torch.bincount(data, minlength=256).double() / data.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


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
    lengths = torch.Generator().manual_seed(seed)
    for step in range(steps):
        length = draw_sequence_length(bptt, lengths)
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
    write_atomically(stem.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))
    try:
        plot(curves, unigram, f"{summary['text']}; {summary['device']}, {args.dtype}", stem.with_suffix(".png"))
        print(f"wrote {stem}.json and .png")
    except ImportError as err:
        print(f"wrote {stem}.json; no plot ({err}: pip install matplotlib)")


if __name__ == "__main__":
    main()
