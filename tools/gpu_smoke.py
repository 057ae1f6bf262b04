"""The smoke step of tools/gpu_check.sh: does every backend of every op run at all, and is the cuda
LSTM bitwise reproducible at the paper's size?

    python tools/gpu_smoke.py [--device cuda|cpu] [--json PATH]

1. One tiny call per (op, backend), forward and backward, float32, then a device synchronize, so an
   illegal address or a launch error is caught here and named, not three phases later. The ops, their
   inputs (the "smoke" shapes) and calls come from the tests' registry, tests/op_cases.py. Each result
   is held loosely against the reference (relative error under 1e-2: this finds crashes and garbage,
   the tests find the rest).
2. The paper's LSTM layer (T 1024, B 16, I = H = 1024) in bfloat16 with the cuda backend, forward
   and backward 10 times on the same inputs; every output and gradient must be bitwise equal to the
   first run's. The kernel promises a fixed reduction order, so a difference is a race between
   blocks (a missing grid sync, a read before another block's write).

With --device cpu (gpu_check.sh --dry-run) the same steps run on CPU: the triton kernels in
Triton's interpreter, the cuda backend reported as unavailable, and the reproducibility loop with
the "torch" backend at a small size, so that every line of this script runs without a GPU.
Prints one line per check (a crash's traceback goes to the --json file) and exits with 1 if any
check failed. Expected time on an H200: about
30 s, most of it compiling the eight Triton kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", type=Path, help="also write the results here (JSON)")
    parser.add_argument("--repeats", type=int, default=10, help="runs of the reproducibility check")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2, got {args.repeats}")
    return args


def op_cases():
    """tests/op_cases.py's registry of the ops (their inputs and calls), imported once torch may be."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)  # the registry, and the tolerances module it imports
    from op_cases import OP_CASES
    return OP_CASES


def call(op: str, backend: str, inputs: dict):
    """The op's output tensor (for lstm, y) for ``inputs``."""
    out = op_cases()[op].call(inputs, backend=backend)
    return out[0] if isinstance(out, tuple) else out


def forward_backward(op: str, backend: str, inputs: dict):
    """(output, gradients of every input) for a fixed cotangent, on fresh leaves."""
    import torch
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = call(op, backend, leaves)
    cotangent = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    grads = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()))
    return [out.detach(), *grads]


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not bool(a.isfinite().all()):
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def smoke_calls(device) -> list[dict]:
    import torch

    import sharnn_fast
    results = []
    backends = {"lstm": ["reference", "torch", "triton", "cuda"], "attention": ["reference", "torch", "triton"],
                "boom": ["reference", "torch", "triton"]}
    for op, names in backends.items():
        torch.manual_seed(0)
        inputs = op_cases()[op].inputs("smoke", device=device)
        expected = forward_backward(op, "reference", inputs)
        for backend in names:
            started = time.perf_counter()
            row = dict(check=f"{op} {backend}", seconds=None)
            try:
                got = forward_backward(op, backend, inputs)
                synchronize(device)
                error = max(relative_error(a, b) for a, b in zip(got, expected))
                row.update(status="ok" if error < 1e-2 else "FAIL",
                           detail=f"max relative error {error:.2g} (fwd+bwd)")
            except sharnn_fast.BackendUnavailableError as err:
                # Unavailable is a failure on a GPU (everything must run there), a note on CPU.
                row.update(status="FAIL" if device.type == "cuda" else "unavailable", detail=str(err)[:300])
            except Exception as err:  # a crash is this step's finding: name it and go on
                row.update(status="FAIL", detail=f"{type(err).__name__}: {str(err)[:300]}",
                           traceback=traceback.format_exc())
            row["seconds"] = round(time.perf_counter() - started, 2)
            results.append(row)
            print(f"smoke {row['check']:<22} {row['status']:<11} {row['seconds']:>6.2f} s  {row['detail']}",
                  flush=True)
    return results


def reproducibility(device, repeats: int) -> dict:
    """The cuda LSTM at the paper's size in bf16 (on CPU: the torch backend, small), `repeats`
    times; every output and gradient bitwise equal to the first run's."""
    import torch
    if device.type == "cuda":
        backend, (T, B, I, H), dtype = "cuda", (1024, 16, 1024, 1024), torch.bfloat16
    else:
        backend, (T, B, I, H), dtype = "torch", (16, 4, 32, 32), torch.float32
    torch.manual_seed(1)
    inputs = op_cases()["lstm"].make_inputs(T, B, I, H, device=device, dtype=dtype, with_state=False)
    check = f"lstm {backend} {dtype} T{T} B{B} H{H} x{repeats} bitwise"
    started, trace = time.perf_counter(), None
    try:
        first = forward_backward("lstm", backend, inputs)
        differing = []
        for run in range(1, repeats):
            again = forward_backward("lstm", backend, inputs)
            synchronize(device)
            names = ["y", *inputs]
            differing += [f"run {run}: {name}" for name, a, b in zip(names, first, again) if not torch.equal(a, b)]
        status = "ok" if not differing else "FAIL"
        detail = "all runs identical" if not differing else "differs: " + ", ".join(differing[:6])
    except Exception as err:  # a crash is this step's finding
        status, detail = "FAIL", f"{type(err).__name__}: {str(err)[:300]}"
        trace = traceback.format_exc()
    row = dict(check=check, status=status, detail=detail, seconds=round(time.perf_counter() - started, 2))
    if trace:
        row["traceback"] = trace
    print(f"smoke {check} {status} {row['seconds']:.2f} s  {detail}", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rows = smoke_calls(device)
    rows.append(reproducibility(device, args.repeats))
    if args.json:
        from sharnn_fast._files import write_atomically
        write_atomically(args.json, json.dumps(rows, indent=1) + "\n")
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    print(f"smoke: {len(rows) - len(failed)} of {len(rows)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
