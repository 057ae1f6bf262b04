"""The one module that loads the compiled extension sharnn_fast._C.

Importing this module neither loads _C nor touches the GPU: the first call that needs the extension
tries to import it, once, and remembers the module or why it could not be loaded. Without the
extension the package still imports and every non-cuda backend still runs.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
from pathlib import Path
from types import ModuleType

_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it is unavailable)."""
    try:
        # import_module (not `from sharnn_fast import _C`) so that a missing module raises
        # ModuleNotFoundError naming sharnn_fast._C, which _why_not_importable tells apart.
        return importlib.import_module("sharnn_fast._C"), ""
    except ImportError as err:
        return None, _why_not_importable(err)


def _why_not_importable(err: ImportError) -> str:
    built = sorted(p.name for p in _PACKAGE_DIR.glob("_C.*") if p.suffix in (".so", ".pyd"))
    if isinstance(err, ModuleNotFoundError) and err.name == "sharnn_fast._C":
        if not built:
            return (f"not built: sharnn_fast was imported from {_PACKAGE_DIR}, which has no "
                    "compiled extension (a source tree?). Run `pip install .` and import "
                    "sharnn_fast from outside the source tree, or `pip install -e .` to build it "
                    "in place.")
        return (f"built for another Python: {_PACKAGE_DIR} has {', '.join(built)} but this "
                f"interpreter loads {', '.join(importlib.machinery.EXTENSION_SUFFIXES)}; "
                "reinstall with `pip install .`.")
    return f"sharnn_fast._C failed to load: {err}"


def extension() -> ModuleType | None:
    """The compiled module sharnn_fast._C, or None when it is unavailable."""
    return _load()[0]


def extension_error() -> str:
    """Why sharnn_fast._C is unavailable; "" when it loaded."""
    return _load()[1]


def build_info() -> dict:
    """What the native build contains; never raises.

    Keys: extension, extension_error, cuda, cuda_compiler_version, cuda_archs, cuda_reason,
    kernels, compiler, cuda_devices (0 unless CUDA kernels were built and a GPU is visible), and
    cuda_devices_error only when counting the devices failed.
    """
    ext, error = _load()
    info = {"extension": ext is not None, "extension_error": error, "cuda": False,
            "cuda_compiler_version": "", "cuda_archs": [],
            "cuda_reason": "the extension is unavailable (see extension_error)" if error else "",
            "kernels": [], "compiler": "", "cuda_devices": 0}
    if ext is None:
        return info
    info.update(ext.build_info())
    if info["cuda"]:
        try:
            info["cuda_devices"] = ext.cuda_device_count()
        except RuntimeError as err:  # e.g. a driver older than the CUDA runtime built in
            info["cuda_devices_error"] = str(err)
    return info


def require_cuda_kernels(what: str) -> ModuleType:
    """Return sharnn_fast._C if its CUDA kernels can run here; else raise RuntimeError naming
    `what`, saying why not and how to fix it."""
    ext, error = _load()
    if ext is None:
        problem = f"the compiled extension sharnn_fast._C is unavailable: {error}"
        fix = ("The CUDA kernels are built only when nvcc is on PATH (or CUDACXX / CUDA_HOME "
               "is set).")
    elif not ext.build_info()["cuda"]:
        reason = ext.build_info()["cuda_reason"]
        problem = f"sharnn_fast._C was built without CUDA kernels: {reason}"
        fix = ("Reinstall with nvcc on PATH (or CUDACXX / CUDA_HOME set) and SHARNN_DISABLE_CUDA "
               "unset: `pip install .`; SHARNN_REQUIRE_CUDA=1 makes that build fail instead of "
               "leaving CUDA out, and SHARNN_CUDA_ARCHS picks the GPU architectures.")
    else:
        try:
            if ext.cuda_device_count() > 0:
                return ext
            problem = (f"no CUDA GPU is visible (CUDA driver version {ext.cuda_driver_version()}; "
                       "0 means no driver)")
        except RuntimeError as err:
            problem = f"the CUDA driver failed: {err}"
        fix = ("Run on a machine with an NVIDIA GPU and driver (check CUDA_VISIBLE_DEVICES), "
               "or choose another backend.")
    raise RuntimeError(f"{what} needs sharnn_fast's CUDA kernels, but {problem.rstrip('.')}. {fix}")


def add_scalar_(tensor, value: float):
    """tensor += value in place with the smoke-test CUDA kernel (proves the launch path); returns
    tensor. `tensor` must be a contiguous float32 CUDA tensor."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError("add_scalar_: `tensor` must be a torch.Tensor, got "
                        f"{type(tensor).__name__}")
    if tensor.device.type != "cuda" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
        layout = "contiguous" if tensor.is_contiguous() else "non-contiguous"
        raise ValueError("add_scalar_: `tensor` must be a contiguous float32 CUDA tensor, got a "
                         f"{layout} {tensor.dtype} tensor on {tensor.device}")
    ext = require_cuda_kernels("add_scalar_")
    # The launch goes to the current device's context, so make it the tensor's device.
    with torch.cuda.device(tensor.device):
        ext.add_scalar_f32(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), float(value),
                           torch.cuda.current_stream(tensor.device).cuda_stream)
    return tensor
