"""Generation: SHARNN.generate's prefill and one-token decode step against the published
generation loop (tests/published_sharnn.py, an eager model called on one token at a time with
hidden and mems carried, which concatenates the whole memory again at every token).

Per-token cases start every call from the same state (the prompt's), so every timed call does the
same work: a memory of P positions plus the new token. The per-token limit is reading every weight
once (all parameters but the embedding table, of which one row is read) and each attention
block's memory once, at the measured copy bandwidth.

CPU: B 1, emsize 256, nhid 1024, 4 layers, a 2000-token prompt, float32. GPU: the paper's size,
B 1 and B 16, bf16 autocast, a 2000-token prompt.
"""
import contextlib

import pytest
import torch

from published_sharnn import PublishedSHARNN
from sharnn_fast import SHARNN
from sharnn_fast.generation import _Decoder, choose_next

SIZES = {
    "cpu": dict(ntoken=256, ninp=256, nhid=1024, nlayers=4, prompt=2000, batches=[1], dtype="float32"),
    "cuda": dict(ntoken=256, ninp=1024, nhid=4096, nlayers=4, prompt=2000, batches=[1, 16], dtype="bfloat16"),
}


def models(size, device):
    args = ("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"], 0.0, 0.0, 0.0)
    torch.manual_seed(0)
    ours = SHARNN(*args).to(device).eval()
    published = PublishedSHARNN(*args).to(device).eval()
    published.load_state_dict(ours.state_dict(), strict=True)
    return ours, published


def autocast(device, size):
    if size["dtype"] == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decode_bytes(model, memory_positions, B):
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith("encoder."))
    attn_blocks = sum(b.attn is not None for b in model.blocks)
    return weights + attn_blocks * memory_positions * B * model.ninp * 4


@pytest.mark.parametrize("B_index", [0, 1])
def test_generate(bench, device, B_index):
    size = SIZES[device.type]
    if B_index >= len(size["batches"]):
        pytest.skip(f"only B in {size['batches']} on {device.type}")
    B, P = size["batches"][B_index], size["prompt"]
    ours, published = models(size, device)
    prompt = torch.randint(0, size["ntoken"], (P, B), device=device)
    shape = dict(B=B, prompt=P, d=size["ninp"], F=size["nhid"], layers=size["nlayers"], dtype=size["dtype"])

    with torch.no_grad(), autocast(device, size):
        bench.compare(
            f"generate prefill B {B}",
            {"published": lambda: published(prompt), "generate (auto)": lambda: ours(prompt)},
            baseline="published", size=shape, work=dict(tokens=P * B), budget="model")

        # The state after the prompt, shared by every timed call.
        h, hidden, mems, _, _ = published(prompt)
        token = published.decoder(h[-1]).argmax(-1)  # [B]
        decoder = _Decoder(ours, *ours(prompt, return_h=False)[1:])
        start_hidden = list(decoder.hidden)
        rings = [memory for memory in decoder.memories if memory is not None]
        start_rings = [(memory.filled, memory.head) for memory in rings]

        def published_step():
            out, _, _, _, _ = published(token.unsqueeze(0), hidden=hidden, mems=mems)
            return published.decoder(out[-1]).argmax(-1)

        def our_step():
            decoder.hidden = list(start_hidden)
            for memory, (filled, head) in zip(rings, start_rings):
                memory.filled, memory.head = filled, head
            return choose_next(ours.decoder(decoder.step(token)), False, 1.0, None, None, None)

        bench.compare(
            f"generate decode per token B {B}",
            {"published loop": published_step, "generate": our_step},
            baseline="published loop", size=dict(shape, memory=P),
            work=dict(tokens=B, bytes=decode_bytes(ours, P + 1, B), steps=1))


_FIRST_FORWARD = """
import sys, torch
sys.path.insert(0, {tests!r})
if {published}:
    from published_sharnn import PublishedSHARNN as Model
else:
    from sharnn_fast import SHARNN as Model
model = Model("LSTM", 256, 64, 256, 3).eval()
with torch.no_grad():
    model(torch.randint(0, 256, (16, 1)))
"""


def test_first_forward_in_a_fresh_process(bench, device):
    """What a user of generate.py waits for before the first token: a new Python process that
    imports the model, builds a small one and runs one forward (CPU, whatever the machine has)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent.parent / "tests")

    def fresh_process(published):
        script = _FIRST_FORWARD.format(tests=tests, published=published)
        return lambda: subprocess.run([sys.executable, "-c", script], check=True)

    bench.compare("first forward in a fresh process",
                  {"published": fresh_process(True), "sharnn_fast": fresh_process(False)},
                  baseline="published", size=dict(B=1, T=16, d=64, F=256, layers=3, dtype="float32"),
                  budget="model")
