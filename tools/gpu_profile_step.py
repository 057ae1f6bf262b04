"""Where one paper-size training step spends its GPU time: the published model against ours, per
backend, one step each under torch.profiler (after warm-up), the top CUDA kernels by total time, and
what autotune_model chooses. A diagnostic for a lent GPU (README, "Building for a GPU"); prints text.

    python -P tools/gpu_profile_step.py [--small]     (--small: tiny sizes, for a CPU dry run)
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from published_sharnn import PublishedSHARNN  # noqa: E402

from sharnn_fast import SHARNN, autotune, autotune_model, explain  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    d, F_, L, T, B, M = (1024, 4096, 4, 1024, 16, 3976) if cuda else (64, 128, 2, 32, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randint(0, 256, (T + 1, B), device=device)

    def build(name):
        torch.manual_seed(0)
        kw = dict(dropout=0.1, dropouth=0.1, dropouti=0.1)
        if name == "published":
            return PublishedSHARNN("LSTM", 256, d, F_, L, **kw).to(device)
        return SHARNN("LSTM", 256, d, F_, L, **kw, backend=name.split()[0]).to(device)

    for name in ["published", "torch", "triton", "auto autotuned"]:
        model = build(name)
        mems = [torch.randn(M, B, d, device=device) if b.attn is not None else [] for b in model.blocks]
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                h = model(x[:-1], mems=mems)[0]
                logits = model.decoder(h)
            F.cross_entropy(logits.float().view(-1, 256), x[1:].reshape(-1)).backward()
            opt.step()
        try:
            if name == "auto autotuned":
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    autotune_model(model, x[:-1], mems=mems)
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize()
        except Exception as err:  # a diagnostic: report and go on
            print(f"== {name}: raised {type(err).__name__}: {err}")
            continue
        finally:
            autotune(None)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, key, 0) for e in prof.key_averages())
        choices = explain().replace("\n", " | ") if name != "published" else "-"
        print(f"== {name}: self {'CUDA' if cuda else 'CPU'} time of one step {total / 1e3:.1f} ms; explain: {choices}")
        print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=70))


if __name__ == "__main__":
    main()
