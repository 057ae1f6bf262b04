"""Which cuDNN LSTM algorithm each precision gets at the paper's size, and what nn.LSTM really runs
under autocast: one LSTM layer (T 1024, B 16, H 1024) forward+backward, medians of interleaved
rounds, next to this package's "cuda" and "torch" backends. A diagnostic for a lent GPU (README,
"Building for a GPU"); prints text.

    python -P tools/gpu_lstm_precision.py [--small] [--rounds N]   (--small: CPU dry run)

Why: PyTorch's autocast wrapper for cuDNN RNNs (aten/src/ATen/cudnn/AutocastRNN.cpp) casts to
float16 whatever the autocast dtype, and cuDNN's persistent LSTM algorithm is chosen for float16
only (aten/src/ATen/native/cudnn/RNN.cpp, get_algo). So the published model's nn.LSTM under bf16
autocast runs in float16, without loss scaling.
"""
import argparse
import statistics

import torch

from sharnn_fast import ops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    T, B, H = (1024, 16, 1024) if cuda else (16, 8, 32)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version() if cuda else '-'}; T {T} B {B} H {H}")
    torch.manual_seed(0)
    module = torch.nn.LSTM(H, H).to(device)
    x32 = torch.randn(T, B, H, device=device)
    params = [p.detach() for p in (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0,
                                   module.bias_hh_l0)]

    def nn_lstm(dtype, autocast=None):
        m = torch.nn.LSTM(H, H).to(device)
        m.load_state_dict(module.state_dict())
        m = m.to(dtype if autocast is None else torch.float32)
        x = x32.to(dtype if autocast is None else torch.float32).requires_grad_()

        def step():
            with torch.autocast(device.type, dtype=autocast or torch.float32,
                                enabled=autocast is not None):
                y, _ = m(x)
            y.float().sum().backward()
            return y.dtype
        return step

    def ours(backend, dtype):
        weights = [p.to(dtype).requires_grad_() for p in params]
        x = x32.to(dtype).requires_grad_()

        def step():
            y, _ = ops.lstm(x, *weights, backend=backend)
            y.float().sum().backward()
            return y.dtype
        return step

    cases = {
        "nn.LSTM float16 (flat weights)": nn_lstm(torch.float16),
        "nn.LSTM bfloat16 (flat weights)": nn_lstm(torch.bfloat16),
        "nn.LSTM float32 under bf16 autocast": nn_lstm(torch.float32, torch.bfloat16),
        "nn.LSTM float32 under fp16 autocast": nn_lstm(torch.float32, torch.float16),
        "ops.lstm torch float16": ours("torch", torch.float16),
        "ops.lstm torch bfloat16 (fp16 route)": ours("torch", torch.bfloat16),
    }
    if cuda:
        cases["ops.lstm cuda float16"] = ours("cuda", torch.float16)
        cases["ops.lstm cuda bfloat16"] = ours("cuda", torch.bfloat16)
    times = {name: [] for name in cases}
    out_dtype = {}
    for name, step in cases.items():  # warm-up, and the dtype each really computes in
        try:
            out_dtype[name] = step()
            step()
        except Exception as err:  # noqa: BLE001 - a diagnostic reports and goes on
            out_dtype[name] = f"FAILED: {str(err).splitlines()[0]}"
    for _ in range(args.rounds):
        for name, step in cases.items():
            if not isinstance(out_dtype[name], torch.dtype):
                continue
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                step()
                times[name].append(0.0)
    for name in cases:
        t = f"{statistics.median(times[name]):8.2f} ms" if times[name] else "       -   "
        print(f"{name:40s} fwd+bwd {t}   output dtype {out_dtype[name]}")
    if cuda:
        print("kernels, one fwd+bwd each:")
        for name in ("nn.LSTM float32 under bf16 autocast", "ops.lstm torch bfloat16 (fp16 route)",
                     "ops.lstm torch float16"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                cases[name]()
                torch.cuda.synchronize()
            top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:3]
            print(f"  {name}: " + "; ".join(f"{e.key[:60]} {e.self_device_time_total / 1e3:.2f} ms"
                                             for e in top))


if __name__ == "__main__":
    main()
