"""Dynamic against static evaluation (sharnn_fast.training.dynamic): one segment of each, timed
interleaved on the same model and text with the "auto" backend. Static: forward, decoder and the
loss without a graph. Dynamic: the same scoring with the graph kept, then the backward and one
update (rms and sgd rules, as ``sharnn eval --dynamic`` runs them).

CPU: the model benchmark's CPU size (conftest.MODEL_SIZES) in float32. GPU (marked gpu, skipped on
a CPU): the paper's size (emsize 1024, nhid 4096, 4 layers, T 1024, B 16, memory 5000 - T), fp16
autocast, the GPU default of ``sharnn eval``, the dynamic step through a GradScaler."""
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_SIZES
from sharnn_fast import SHARNN
from sharnn_fast.training.dynamic import DynamicUpdate, GradientStep
from sharnn_fast.training.distributed import Context


def compare_static_and_dynamic(bench, size, device, precision):
    torch.manual_seed(0)
    model = SHARNN("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"]).to(device).eval()
    T, B = size["T"], size["B"]
    text = torch.randint(0, size["ntoken"], (T + 1, B), device=device)  # [T + 1, B]
    x, y = text[:-1], text[1:]
    with torch.no_grad():  # the memory a long evaluation carries: M positions of every attention block
        _, hidden, mems, _, _ = model(torch.randint(0, size["ntoken"], (max(size["memory"], 1), B), device=device))
    if not size["memory"]:
        mems = None
    autocast = (torch.autocast(device.type, dtype=torch.float16) if precision == "fp16"
                else torch.autocast(device.type, enabled=False))
    ctx = Context(rank=0, world_size=1, local_rank=0, device=device)
    params = [p for p in model.parameters()]
    # rms statistics: any positive mean squares give the step's cost; their values do not matter here
    mean_squares = [torch.full_like(p, 1e-6, dtype=torch.float32) for p in params]

    def segment_loss():
        with autocast:
            h, _, _, _, _ = model(x, hidden=hidden, mems=mems)
            logits = model.decoder(h)  # [T, B, V]
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")

    def static():
        with torch.no_grad():
            segment_loss()

    def dynamic(mean_squares_or_none):
        update = DynamicUpdate(params, lr=0.0, decay=0.02, mean_squares=mean_squares_or_none)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        adapt = GradientStep(update, scaler, ctx)

        def run():  # lr 0: the full cost of a step, and the weights stay as they are across rounds
            adapt(segment_loss() / (T * B))
        return run

    dtype = "float16" if precision == "fp16" else "float32"
    tokens = T * B
    bench.compare("evaluation segment, static and dynamic", {"static": static, "dynamic rms": dynamic(mean_squares),
                                                             "dynamic sgd": dynamic(None)},
                  baseline="static", size=dict(size, dtype=dtype, backend="auto"), work=dict(tokens=tokens),
                  budget="model")


def test_dynamic_evaluation_segment_cpu(bench):
    compare_static_and_dynamic(bench, MODEL_SIZES["cpu"], torch.device("cpu"), "fp32")


@pytest.mark.gpu
def test_dynamic_evaluation_segment_paper_size(bench):
    if not torch.cuda.is_available():
        pytest.skip("the paper's size is benchmarked on a CUDA GPU only")
    compare_static_and_dynamic(bench, MODEL_SIZES["cuda"], torch.device("cuda"), "fp16")
