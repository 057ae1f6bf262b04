"""Builds the native extension sharnn_fast._C with CMake + Ninja (docs/architecture.md).

It never imports torch: the kernels see raw pointers only, so the build needs no torch and one build
works with any torch version. Metadata lives in pyproject.toml; this file only drives CMake.

Environment variables read at build time:
  SHARNN_CUDA_ARCHS       CMake CUDA_ARCHITECTURES (default "80-real;90a-real;90-virtual")
  SHARNN_DISABLE_CUDA=1   build without the CUDA kernels even where nvcc is found
  SHARNN_REQUIRE_CUDA=1   fail unless the CUDA kernels are built (CI sets it)
  CUDACXX, CUDA_HOME      where nvcc is; else PATH; else /usr/local/cuda/bin/nvcc
  MAX_JOBS                parallel compile jobs (default: every CPU)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, PlatformError

ROOT = Path(__file__).resolve().parent
# SASS for A100 (sm_80, which also runs on sm_86/89) and H100 (sm_90a: wgmma, setmaxnreg), plus
# compute_90 PTX that the driver JIT-compiles for GPUs newer than both.
DEFAULT_CUDA_ARCHS = "80-real;90a-real;90-virtual"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc():
    """Return (path to nvcc, "") or (None, why the CUDA kernels are not built)."""
    if env_flag("SHARNN_DISABLE_CUDA"):
        return None, "SHARNN_DISABLE_CUDA=1 was set at build time"
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [
        ("CUDACXX", os.environ.get("CUDACXX")),
        ("$CUDA_HOME/bin/nvcc", cuda_home and os.path.join(cuda_home, "bin", "nvcc")),
        ("PATH", shutil.which("nvcc")),
    ]
    # The usual install location is only a guess, so it is not tried when CUDA_HOME says
    # where CUDA is (that also lets one build without CUDA on a machine that has it).
    if not cuda_home:
        candidates.append(("/usr/local/cuda/bin/nvcc", "/usr/local/cuda/bin/nvcc"))
    for _, path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path, ""
    tried = ", ".join(f"{where} ({path or 'none'})" for where, path in candidates)
    return None, f"nvcc was not found at build time, looked at {tried}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # CMakeLists.txt lists the sources


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11  # a build requirement, so only needed once a build runs

        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise PlatformError(f"{tool} is not on PATH: `pip install cmake ninja`, "
                                    "or build with isolation")
        nvcc, reason = find_nvcc()
        require_cuda = env_flag("SHARNN_REQUIRE_CUDA")
        if nvcc is None and require_cuda:
            raise PlatformError(
                f"SHARNN_REQUIRE_CUDA=1, but the CUDA kernels cannot be built: {reason}. "
                "Put nvcc on PATH, or set CUDACXX=/path/to/nvcc or CUDA_HOME=/path/to/cuda.")

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_path.parent}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSHARNN_CUDA_ARCHS={os.environ.get('SHARNN_CUDA_ARCHS') or DEFAULT_CUDA_ARCHS}",
            f"-DSHARNN_REQUIRE_CUDA={'ON' if require_cuda else 'OFF'}",
        ]
        if nvcc:
            configure += ["-DSHARNN_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        else:
            print(f"sharnn_fast: building without the CUDA kernels: {reason}", flush=True)
            configure += ["-DSHARNN_WITH_CUDA=OFF", f"-DSHARNN_NO_CUDA_REASON={reason}"]
        # Any change of settings, nvcc or cmake itself (build isolation brings its own, in a new
        # temporary folder each time) starts from a fresh cache, as stale cached settings would leak
        # into the build; the same settings again (e.g. --no-build-isolation) rebuild incrementally.
        settings = "\n".join([shutil.which("cmake"), *configure])
        stamp = build_dir / "sharnn_settings.txt"
        if not stamp.is_file() or stamp.read_text() != settings:
            configure.append("--fresh")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        try:
            subprocess.run(configure, check=True)
            stamp.write_text(settings)
            subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)
        except subprocess.CalledProcessError as err:
            hint = ("\nIf the error above is in CUDA code (nvcc, a .cu file), set "
                    "SHARNN_DISABLE_CUDA=1 to build without the CUDA kernels." if nvcc else "")
            raise CompileError(f"building sharnn_fast._C failed: `{' '.join(err.cmd)}` "
                               f"exited with {err.returncode}.{hint}") from None
        if not out_path.is_file():
            raise CompileError(f"CMake finished but did not produce {out_path}")


# Guarded so that tests/test_build.py can import find_nvcc; pip and setuptools run this file
# as __main__.
if __name__ == "__main__":
    setup(ext_modules=[CMakeExtension("sharnn_fast._C")], cmdclass={"build_ext": CMakeBuild})
