"""The body of ``sharnn generate``: load a checkpoint, continue a prompt of bytes with
:meth:`SHARNN.generate <sharnn_fast.model.SHARNN.generate>` under the chosen precision, and stream
the new bytes as UTF-8 text.

Command-line side: it builds on :mod:`sharnn_fast.training` (checkpoints, devices, precision), which
the model and :mod:`sharnn_fast.generation` never import.
"""
from __future__ import annotations

import codecs
import logging
import sys

import torch

from .generation import generate, logger as generation_logger
from .training.checkpoint import load_checkpoint
from .training.config import NTOKEN, autocast_context
from .training.distributed import resolve_device


def generate_text(checkpoint, prompt: bytes, out, *, max_new_tokens=200, do_sample=True, temperature=1.0,
                  top_k=None, top_p=None, seed=None, device=None, precision="fp32", backend=None,
                  compile=None) -> bytes:
    """Continue the bytes ``prompt`` with the byte-level model of a ``sharnn train`` checkpoint,
    writing the new bytes to the text stream ``out`` as they come (decoded as UTF-8, invalid
    sequences replaced). Returns the new bytes.

    device: default CUDA if available, else CPU. precision: "fp32", or "bf16"/"fp16" autocast.
    backend: None is the checkpoint's where it runs, else auto (see :func:`sharnn_fast.load_checkpoint`).
    compile: :meth:`SHARNN.generate`'s (None: automatic, True, False); its report ("compiled the
    decode step in S s") and its warning go to stderr, one line each.
    Raises the errors of :func:`sharnn_fast.load_checkpoint` and :meth:`SHARNN.generate`, and
    ValueError for an empty prompt, a model that is not byte-level or another precision.
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one byte")
    device = resolve_device(device)
    model, _ = load_checkpoint(checkpoint, map_location=device, backend=backend)
    if model.encoder.num_embeddings != NTOKEN:
        raise ValueError(f"{checkpoint}: a byte-level model has {NTOKEN} tokens, this one has "
                         f"{model.encoder.num_embeddings}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    autocast = autocast_context(device, precision)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new = bytearray()

    def stream(token):
        byte = int(token[0])
        new.append(byte)
        out.write(decoder.decode(bytes([byte])))
        out.flush()

    tokens = torch.tensor(list(prompt), dtype=torch.int64, device=device).unsqueeze(1)  # [T, 1]
    report = logging.StreamHandler(sys.stderr)
    report.setFormatter(logging.Formatter("%(message)s"))
    level = generation_logger.level
    generation_logger.addHandler(report)
    generation_logger.setLevel(logging.INFO)
    try:
        with autocast:
            generate(model, tokens, max_new_tokens, do_sample=do_sample, temperature=temperature,
                     top_k=top_k, top_p=top_p, generator=generator, on_token=stream, compile=compile)
    finally:
        generation_logger.removeHandler(report)
        generation_logger.setLevel(level)
    out.write(decoder.decode(b"", final=True))
    out.flush()
    return bytes(new)
