"""Shared test set-up. Tests marked ``gpu`` are skipped on machines without CUDA; the device is
queried once when this file is loaded and when a test is set up, never by test modules at import.
Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
before triton is imported)."""
import os

import pytest
import torch

# Before anything imports triton (sharnn_fast may, through torch): triton decides at import time
# whether its own helpers run compiled or interpreted.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sharnn_fast  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Where the Triton kernels run: the GPU when there is one, and then the test is marked gpu (so
# `pytest -m gpu` selects it), else the CPU under the interpreter.
TRITON_DEVICE = (pytest.param("cuda", marks=pytest.mark.gpu) if torch.cuda.is_available()
                 else pytest.param("cpu", id="cpu-interpreter"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from a known seed and the default backend."""
    torch.manual_seed(0)
    sharnn_fast.set_backend(None)
    yield
    sharnn_fast.set_backend(None)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[TRITON_DEVICE])
def triton_device(request):
    """The device for the triton backend's tests: the GPU (marked gpu), else the interpreter's CPU."""
    return torch.device(request.param)
