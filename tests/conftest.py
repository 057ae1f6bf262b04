"""Shared test set-up. Tests marked ``gpu`` are skipped on machines without CUDA; the device is
queried when the session starts or a test is set up, never at import time. Without a GPU, Triton
kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before any kernel module
is imported)."""
import os

import pytest
import torch

import sharnn_fast

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


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
