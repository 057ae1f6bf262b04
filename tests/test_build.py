"""The native build: what sharnn_fast._C reports, and the CUDA launch path (smoke kernel)."""
import glob
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sharnn_fast import _native

BUILD_INFO_KEYS = {"extension", "extension_error", "cuda", "cuda_compiler_version", "cuda_archs",
                   "cuda_reason", "kernels", "compiler", "cuda_devices"}
SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def cuda_kernels_built():
    ext = _native.extension()
    return ext is not None and ext.build_info()["cuda"]


def no_gpu_here():
    # Independent of the extension: no device nodes and no GPU seen by torch.
    return not torch.cuda.is_available() and not glob.glob("/dev/nvidia[0-9]*")


def test_build_info_has_every_key_and_consistent_values():
    info = _native.build_info()
    assert BUILD_INFO_KEYS <= info.keys()
    assert info["extension"] == (_native.extension() is not None)
    assert (info["extension_error"] == "") == info["extension"]
    if info["cuda"]:
        assert info["cuda_reason"] == ""
        assert info["cuda_compiler_version"] and info["cuda_archs"] and info["kernels"]
    else:
        assert info["cuda_reason"], "a build without CUDA must say why"
        assert info["kernels"] == [] and info["cuda_devices"] == 0


def test_cuda_build_matches_whether_nvcc_is_found():
    # Assumes the tests run in the environment that built the package (as in CI).
    if _native.extension() is None:
        pytest.skip(f"no compiled extension: {_native.extension_error()}")
    info = _native.extension().build_info()
    if "SHARNN_DISABLE_CUDA" in info["cuda_reason"]:
        pytest.skip(f"built without CUDA on purpose: {info['cuda_reason']}")
    spec = importlib.util.spec_from_file_location("sharnn_setup", SETUP_PY)
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # setup() itself only runs as __main__
    nvcc, reason = setup_module.find_nvcc()
    assert info["cuda"] == (nvcc is not None), f"nvcc lookup now: {nvcc or reason}; build: {info}"


def test_cuda_build_expected():
    if os.environ.get("SHARNN_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("set SHARNN_EXPECT_CUDA_BUILD=1 to require that the CUDA kernels were compiled")
    info = _native.build_info()
    assert info["extension"], info["extension_error"]
    assert info["cuda"], info["cuda_reason"]
    assert "smoke.add_scalar_f32" in info["kernels"]
    assert any(arch.split("-")[0].rstrip("af").isdigit() for arch in info["cuda_archs"]), info
    assert info["cuda_compiler_version"].count(".") == 2  # e.g. 13.0.88


def test_cuda_device_queries_do_not_raise():
    if not cuda_kernels_built():
        pytest.skip(f"CUDA kernels not built: {_native.build_info()['cuda_reason']}")
    ext = _native.extension()
    count = ext.cuda_device_count()
    assert count >= 0 and ext.cuda_driver_version() >= 0
    assert ext.cuda_runtime_version() >= 12000  # static cudart, so known without a driver
    if no_gpu_here():
        assert count == 0 and _native.build_info()["cuda_devices"] == 0


def test_require_cuda_kernels_explains_why_not():
    if _native.build_info()["cuda_devices"] > 0:
        pytest.skip("this machine can run the CUDA kernels")
    with pytest.raises(RuntimeError, match="my_op needs sharnn_fast's CUDA kernels") as caught:
        _native.require_cuda_kernels("my_op")
    message = str(caught.value)
    assert "pip install ." in message or "GPU" in message, message


@pytest.mark.parametrize("make", [
    lambda: torch.randn(10),                      # CPU
    lambda: torch.randn(10, dtype=torch.float64),  # CPU and float64
], ids=["cpu_f32", "cpu_f64"])
def test_add_scalar_rejects_non_cuda_tensor(make):
    with pytest.raises(ValueError, match="`tensor` must be a contiguous float32 CUDA tensor"):
        _native.add_scalar_(make(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [False, True], ids=["current_stream", "side_stream"])
def test_add_scalar_matches_torch(side_stream):
    x = torch.randn(1_000_003, device="cuda")  # odd size: the grid-stride tail
    value = 0.8125
    expected = x + value
    if side_stream:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _native.add_scalar_(x, value)
        torch.cuda.current_stream().wait_stream(stream)
    else:
        _native.add_scalar_(x, value)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
