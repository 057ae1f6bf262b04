"""Compile every GPU kernel of sharnn_fast for sm_90a and sm_80 without a GPU, and report what the
compiler made of it: registers, shared memory, stack, local-memory (spill) instructions, and the
instruction mix that matters (tensor-core instructions present, 16-byte loads).

    python tools/compile_report.py [--arch 90 80] [--out benchmarks/results] [--jobs N]

Triton kernels: the launchers themselves run on meta tensors (no memory, no device) at the paper's
sizes and at the sizes the tests use on a GPU, in float32, float16 and bfloat16, with and without
dropout; every launch they make is recorded instead of run, so the report compiles exactly the
kernels, block sizes, launch options and argument specialisations (16-divisible sizes, strides of
1) that would run. Each distinct launch is compiled with ``triton.compile`` for a GPUTarget of the
arch (Triton's own ptxas, no GPU needed) and its cubin read with the wheel's cuobjdump.

CUDA kernels: the resources of the installed extension sharnn_fast._C, read with cuobjdump from the
machine code the native build embedded for each arch (the figures ``nvcc -Xptxas -v`` prints).

Writes benchmarks/results/compile_sm<arch>.md and .json, prints a summary, and exits with 1 if any
kernel fails to compile or needs more shared memory than the arch has, or a kernel listed in HOT
spills (HOT says why each must not), 2 on bad
arguments, a missing tool or an error of the tool itself. Expected time on 2 idle CPU cores: about
3 minutes with an empty Triton cache (6 minutes measured on 2 cores shared with other work), less
with a warm one (TRITON_CACHE_DIR, default ~/.triton/cache).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

# Kernels that must not spill, and why: the one list the verdict uses. A spill is any stack frame or
# local-memory instruction; (kernel, dtypes, archs) entries here fail the report (exit 1) when they
# spill in any variant. Everything else is reported but may spill.
ALL = ("float32", "float16", "bfloat16")
BOTH = ("sm_90a", "sm_80")
SM90_TILES = ("the tiles are sized for the H200 (sm_90a, wgmma); on sm_80 the same tile spills "
              "a few dozen bytes (mma.sync keeps operand fragments in registers), accepted until an "
              "A100 shows whether a smaller tile is faster there")
HOT = [
    ("boom_fwd_kernel", ALL, ("sm_90a",),
     "the Boom forward is the model's largest GEMM (F = 4 d), run by every block in every step; "
     + SM90_TILES),
    ("boom_bwd_dz_kernel", ALL, BOTH,
     "the Boom backward recomputes a forward-sized GEMM; spilled registers there cost more than "
     "the [N, F] activation it avoids storing"),
    ("lstm_fwd_step_kernel", ALL, BOTH, "runs T = 1024 times in a row per layer: the recurrence is "
     "the critical path"),
    ("lstm_bwd_step_kernel", ALL, BOTH, "runs T = 1024 times in a row per layer: the recurrence is "
     "the critical path"),
    ("attention_fwd_kernel", ("float16", "bfloat16"), ("sm_90a",),
     "the model trains in bf16; float32 attention takes smaller tiles and may spill a little; "
     + SM90_TILES),
    ("attention_bwd_dkdv_kernel", ("float16", "bfloat16"), ("sm_90a",), "as the attention forward"),
    ("attention_bwd_dq_kernel", ("float16", "bfloat16"), ("sm_90a",), "as the attention forward"),
    ("attention_wide_softmax_fwd_kernel", ALL, BOTH,
     "the materialised attention path's one pass over every score that is not a cuBLAS GEMM "
     "([16, 1024, 5000] at the paper's size): a spill there is paid per score"),
    ("attention_wide_softmax_bwd_kernel", ALL, BOTH, "as the wide softmax forward, in backward"),
    ("lstm_fwd_kernel", ALL, BOTH,
     "the persistent cuda LSTM keeps every step in one launch: a spill there is paid T times"),
    ("lstm_bwd_kernel", ALL, BOTH, "as the cuda LSTM forward"),
]

DTYPE_NAMES = ("float32", "float16", "bfloat16")
ARCH_NAMES = {90: "sm_90a", 80: "sm_80"}
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): the H100/H200 and the
# A100. Triton checks it only when a kernel is loaded on a device, so the report checks it here.
SHARED_LIMIT = {"sm_90a": 232448, "sm_80": 166912}


def hot_reason(kernel: str, dtype: str, arch: str) -> Optional[str]:
    """Why ``kernel`` must not spill in ``dtype`` on ``arch``, or None if it may."""
    for name, dtypes, archs, reason in HOT:
        if name == kernel and dtype in dtypes and arch in archs:
            return reason
    return None


# ----------------------------------------------------------------------------------------------
# Recording the launches the launchers make
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the JITFunction and its arguments."""
    kernel: object
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def configuration(self) -> tuple:
        """What the launcher chose: the kernel, its tensors' dtypes, constexprs and launch options.
        The report compiles each configuration once, from the first launch that chose it (the
        paper's sizes come first), so at the paper's sizes it compiles exactly what runs there,
        down to Triton's specialisation of the integer arguments (1, multiples of 16); other sizes
        that choose the same configuration differ only in that specialisation."""
        dtypes = tuple(str(arg.dtype) if hasattr(arg, "data_ptr") else None for arg in self.args)
        return (self.name, dtypes, tuple(sorted(self.kwargs.items())))

    def specialisation(self) -> str:
        """The integer arguments' properties Triton specialises on, as 'name=1', 'name%16'."""
        parts = []
        for param, arg in zip(self.kernel.params, self.args):
            if isinstance(arg, int) and not isinstance(arg, bool) and not param.do_not_specialize:
                if arg == 1:
                    parts.append(f"{param.name}=1")
                elif arg % 16 == 0:
                    parts.append(f"{param.name}%16")
        return " ".join(parts)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(modules, launches: list):
    """Within: every kernel of ``modules`` records its launches into ``launches`` instead of
    running, and torch.library.wrap_triton passes kernels through unchanged."""
    import torch
    import triton
    saved = []
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and "kernel" in name:
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, launches))
    wrap_triton = torch.library.wrap_triton
    torch.library.wrap_triton = lambda kernel: kernel
    try:
        yield
    finally:
        torch.library.wrap_triton = wrap_triton
        for module, name, value in saved:
            setattr(module, name, value)


def _meta(*shape, dtype):
    import torch
    return torch.empty(*shape, dtype=dtype, device="meta")


def boom_cases(dtype, dropout_p: float, sizes: str) -> list[Callable[[], None]]:
    """The Boom forward and backward at the paper's size (16 x 1024 tokens, d 1024, F 4096) or at
    every size tests/ops/test_boom_triton.py runs on a GPU, with and without a bias."""
    import torch
    if sizes == "paper":
        shapes = [(16 * 1024, 1024, 4096, True)]
    else:
        test = _test_module("test_boom_triton")
        shapes = [(_prod(lead), d, F, bias) for lead, d, F in test.SHAPES for bias in (True, False)]

    def case(N, d, F, bias):
        def run():
            x, w = _meta(N, d, dtype=dtype), _meta(F, d, dtype=dtype)
            b = _meta(F, dtype=dtype) if bias else None
            seed = _meta(1, dtype=torch.int64) if dropout_p > 0 else None
            torch.ops.sharnn_fast.boom_fwd(x, w, b, seed, dropout_p)
            torch.ops.sharnn_fast.boom_bwd(_meta(N, d, dtype=dtype), x, w, b, seed, dropout_p)
        return run
    return [case(*shape) for shape in shapes]


def lstm_cases(dtype, dropout_p: float, sizes: str) -> list[Callable[[], None]]:
    """The triton LSTM's step kernels (forward, and backward with and without a gradient for the
    cell states) at the paper's size (B 16, H 1024) or at the tests' GPU sizes. No dropout inside
    the op: the model's dropouts act between the layers."""
    import torch
    if dropout_p > 0:
        return []
    module = importlib.import_module("sharnn_fast.ops.lstm.triton")
    if sizes == "paper":
        shapes = [(3, 16, 1024)]  # T does not change the launches (t is not specialised)
    else:
        lstm, triton_test = _test_module("test_lstm"), _test_module("test_lstm_triton")
        shapes = sorted({(min(T, 3), B, H) for T, B, _, H in lstm.SHAPES}
                        | {(3, 17, 80), (3, 3, 24), (3, 3, 48)}  # the GPU-tile and graph tests
                        | {(3, triton_test.PAPER_SHAPE[1], triton_test.PAPER_SHAPE[3])})

    def case(T, B, H):
        def run():
            f32 = torch.float32
            xg, w_hh = _meta(T, B, 4 * H, dtype=dtype), _meta(4 * H, H, dtype=dtype)
            h0 = c0 = _meta(B, H, dtype=dtype)
            module.lstm_triton_forward._init_fn(xg, w_hh, h0, c0)
            hs, c_all, gates = _meta(T + 1, B, H, dtype=dtype), _meta(T + 1, B, H, dtype=f32), \
                _meta(T, B, 4 * H, dtype=f32)
            for d_c_all in (None, _meta(T + 1, B, H, dtype=f32)):
                module.lstm_triton_backward._init_fn(_meta(T + 1, B, H, dtype=dtype), d_c_all, w_hh,
                                                     hs, c_all, gates)
        return run
    return [case(*shape) for shape in shapes]


def attention_cases(dtype, dropout_p: float, sizes: str) -> list[Callable[[], None]]:
    """The attention kernels at the paper's sizes (Tq 1024, Tk 1024 and 5000, B 16, d 1024) or at
    the sizes tests/ops/test_attention_triton.py runs on a GPU."""
    import torch
    if sizes == "paper":
        shapes = [(1024, 1024, 16, 1024, 1024), (1024, 5000, 16, 1024, 1024)]
    else:
        test = _test_module("test_attention_triton")
        shapes = list(test.SHAPES) + [test.WIDE_SHAPE]

    def case(Tq, Tk, B, d, dv):
        def run():
            q, k, v = _meta(Tq, B, d, dtype=dtype), _meta(Tk, B, d, dtype=dtype), _meta(Tk, B, dv, dtype=dtype)
            seed = _meta(1, dtype=torch.int64) if dropout_p > 0 else None
            out, lse = torch.ops.sharnn_fast.attention_fwd(q, k, v, dropout_p, seed)
            torch.ops.sharnn_fast.attention_bwd(_meta(Tq, B, dv, dtype=dtype), q, k, v, out, lse,
                                                dropout_p, seed)
        return run
    return [case(*shape) for shape in shapes]


def attention_wide_cases(dtype, dropout_p: float, sizes: str) -> list[Callable[[], None]]:
    """The materialised-scores attention path (its two softmax kernels; the products are cuBLAS) at
    the paper's sizes or at the wide sizes tests/ops/test_attention_triton_wide.py runs on a GPU.
    The custom ops' own functions are called: on meta tensors the ops would run their fakes."""
    import torch
    module = importlib.import_module("sharnn_fast.ops.attention.triton_wide")
    if sizes == "paper":
        shapes = [(1024, 1024, 16, 1024, 1024), (1024, 5000, 16, 1024, 1024)]
    else:
        shapes = list(_test_module("test_attention_triton_wide").WIDE_SHAPES)

    def case(Tq, Tk, B, d, dv):
        def run():
            q, k, v = _meta(Tq, B, d, dtype=dtype), _meta(Tk, B, d, dtype=dtype), _meta(Tk, B, dv, dtype=dtype)
            seed = _meta(1, dtype=torch.int64) if dropout_p > 0 else None
            _, lse = module.attention_wide_fwd._init_fn(q, k, v, dropout_p, seed)
            module.attention_wide_bwd._init_fn(_meta(Tq, B, dv, dtype=dtype), q, k, v, lse, dropout_p, seed)
        return run
    return [case(*shape) for shape in shapes]


OPS = {"boom": ("sharnn_fast.ops.boom.triton", boom_cases),
       "lstm": ("sharnn_fast.ops.lstm.triton", lstm_cases),
       "attention": ("sharnn_fast.ops.attention.triton_flash", attention_cases),
       "attention_wide": ("sharnn_fast.ops.attention.triton_wide", attention_wide_cases)}


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _test_module(name: str):
    """A test module, for the sizes it runs (so the report follows the tests when they change)."""
    for folder in (ROOT / "tests", ROOT / "tests" / "ops"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return importlib.import_module(name)


@dataclasses.dataclass
class Job:
    """One distinct compilation and every (op, sizes, dtype, dropout) that launches it."""
    op: str
    launch: Launch
    dtype: str
    dropout: bool
    used_at: set


def collect_jobs(ops, sizes=("paper", "tests")) -> list[Job]:
    import torch
    jobs: dict[tuple, Job] = {}
    for op in ops:
        module_name, cases = OPS[op]
        module = importlib.import_module(module_name)
        for dtype_name in DTYPE_NAMES:
            dtype = getattr(torch, dtype_name)
            for dropout_p in (0.0, 0.1):
                for where in sizes:
                    for run in cases(dtype, dropout_p, where):
                        launches: list[Launch] = []
                        with recording([module], launches):
                            run()
                        for launch in launches:
                            job = jobs.setdefault(launch.configuration(), Job(
                                op, launch, dtype_name, dropout_p > 0, set()))
                            job.used_at.add(where)
    return list(jobs.values())


# ----------------------------------------------------------------------------------------------
# Compiling and reading the machine code
# ----------------------------------------------------------------------------------------------
class _TargetOnlyDriver:
    """What JITFunction.warmup asks of a driver, for a GPU that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch  # one binder per arch in the kernel's per-device cache

    def get_current_stream(self, device=None):
        return 0


def nvidia_tool(name: str) -> str:
    """cuobjdump / nvdisasm: Triton's wheel carries them; else PATH."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in Triton's wheel ({bundled}) nor on PATH")
    return found


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def sass_figures(cubin_path: str, function: Optional[str] = None) -> dict:
    """Instruction mix of one function of a cubin (or its only one)."""
    sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", *(["-fun", function] if function else []),
                           cubin_path], capture_output=True, text=True, check=True).stdout
    opcodes = Counter(_OPCODE.findall(sass))
    count = lambda pred: sum(n for op, n in opcodes.items() if pred(op))  # noqa: E731
    return dict(
        instructions=sum(opcodes.values()),
        wgmma=count(lambda op: op.startswith(("HGMMA", "QGMMA", "IGMMA"))),
        mma=count(lambda op: op.startswith(("HMMA", "IMMA"))),
        loads_16B=count(lambda op: op.startswith(("LDG", "LDGSTS")) and ".128" in op),
        loads_narrow=count(lambda op: op.startswith(("LDG", "LDGSTS")) and ".128" not in op
                           and not op.startswith("LDGDEPBAR")),
        tma_loads=count(lambda op: op.startswith("UTMALDG")),
        local_stores=count(lambda op: op.startswith("STL")),
        local_loads=count(lambda op: op.startswith("LDL")),
    )


def compile_job(job: Job, arch: int) -> dict:
    """Compile one launch for ``arch`` and read its resources."""
    import triton
    from triton.runtime import driver
    driver.set_active(_TargetOnlyDriver(arch))
    started = time.perf_counter()
    try:
        compiled = job.launch.kernel.warmup(*job.launch.args, grid=(1,), **job.launch.kwargs)
    except Exception as err:  # any compiler error is a finding, reported per kernel
        message = str(err).strip().splitlines()
        return dict(error=f"{type(err).__name__}: {' '.join(message[:3])[:400]}")
    seconds = time.perf_counter() - started
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        registers, stack, _, local = map(int, _RESOURCES.search(usage).groups())
        figures = sass_figures(cubin.name)
    return dict(registers=registers, stack=stack, local=local, shared=compiled.metadata.shared,
                compile_s=round(seconds, 1), triton=triton.__version__, **figures)


_WORK: list = []  # (job, arch) for the worker processes, inherited through fork


def _compile_indexed(index: int) -> dict:
    job, arch = _WORK[index]
    return compile_job(job, arch)


def compile_all(jobs: list[Job], archs, processes: int) -> list[dict]:
    _WORK[:] = [(job, arch) for arch in archs for job in jobs]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_compile_indexed, range(len(_WORK)), chunksize=1)
    else:
        results = [_compile_indexed(i) for i in range(len(_WORK))]
    rows = []
    for (job, arch), result in zip(_WORK, results):
        config = {k: v for k, v in job.launch.kwargs.items() if k.startswith("BLOCK_") or k.startswith("num_")}
        flags = {k: v for k, v in job.launch.kwargs.items()
                 if k not in config and k != "DOT_PRECISION" and isinstance(v, bool)}
        rows.append(dict(kind="triton", op=job.op, kernel=job.launch.name, arch=ARCH_NAMES[arch],
                         dtype=job.dtype, dropout=job.dropout, used_at=sorted(job.used_at),
                         dot_precision=job.launch.kwargs.get("DOT_PRECISION"), flags=flags,
                         config=config, specialisation=job.launch.specialisation(), **result))
    return rows


# ----------------------------------------------------------------------------------------------
# The CUDA kernels of the native build
# ----------------------------------------------------------------------------------------------
_CUDA_DTYPES = {"__nv_bfloat16": "bfloat16", "__half": "float16", "f": "float32"}


def cuda_rows(archs) -> tuple[list[dict], Optional[str]]:
    """Resources of every kernel in the installed sharnn_fast._C, per arch; or why there are none."""
    spec = importlib.util.find_spec("sharnn_fast._C")
    if spec is None or not spec.origin:
        return [], "sharnn_fast._C is not built (pip install . builds it)"
    cuobjdump = nvidia_tool("cuobjdump")
    wanted = {ARCH_NAMES[a]: a for a in archs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # One cubin per (source file, arch); cuobjdump names them <library>.<n>.sm_<arch>.cubin.
        extracted = subprocess.run([cuobjdump, "-xelf", "all", spec.origin], cwd=tmp, capture_output=True, text=True)
        if extracted.returncode != 0:
            return [], f"no CUDA machine code in {spec.origin}: {extracted.stderr.strip()[:200]}"
        for cubin in sorted(Path(tmp).glob("*.cubin")):
            arch = "sm_" + cubin.name.rsplit(".sm_", 1)[-1].removesuffix(".cubin")
            if arch not in wanted:
                continue
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            for function, resources in re.findall(r"Function (\S+):\n\s*(.*)", usage):
                registers, stack, shared, local = map(int, _RESOURCES.search(resources).groups())
                name, dtype = _cuda_kernel_name(function)
                rows.append(dict(kind="cuda", op="lstm" if "lstm" in name else "smoke", kernel=name,
                                 arch=arch, dtype=dtype, dropout=False, used_at=["paper", "tests"],
                                 registers=registers, stack=stack, local=local, shared=shared,
                                 config={}, flags={}, **sass_figures(str(cubin), function)))
    if not rows:
        return [], f"{spec.origin} holds no machine code for {', '.join(wanted)} (built without CUDA?)"
    return rows, None


def _cuda_kernel_name(mangled: str) -> tuple[str, str]:
    """(name, dtype) of a kernel from its mangled name: ("lstm_fwd_kernel", "bfloat16") from
    ..._ec2c2e4415lstm_fwd_kernelI13__nv_bfloat16EEv... (a name is its length, then its letters)."""
    for start in range(len(mangled)):
        m = re.match(r"\d+", mangled[start:])
        if m is None:
            continue
        end = start + m.end()
        name = mangled[end:end + int(m.group())]
        if name.endswith("_kernel") and re.fullmatch(r"[A-Za-z_]\w*", name):
            template = re.match(r"I(?:\d+)?(__nv_bfloat16|__half|f)E", mangled[end + len(name):])
            return name, _CUDA_DTYPES[template.group(1)] if template else ""
    return mangled, ""


# ----------------------------------------------------------------------------------------------
# Verdict and output
# ----------------------------------------------------------------------------------------------
def spills(row: dict) -> bool:
    return bool(row.get("stack") or row.get("local") or row.get("local_stores") or row.get("local_loads"))


def findings(rows: list[dict]) -> list[str]:
    """Every compile error, every kernel that needs more shared memory than its arch has, and every
    spill in a HOT kernel, one line each."""
    found = []
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row['dtype']}{' dropout' if row['dropout'] else ''}"
        if "error" in row:
            found.append(f"compile error: {where}: {row['error']}")
        elif row["shared"] > SHARED_LIMIT[row["arch"]]:
            found.append(f"shared memory over the limit: {where} {_config_text(row)}: {row['shared']} B, "
                         f"{row['arch']} allows {SHARED_LIMIT[row['arch']]} B per block")
        elif spills(row) and (reason := hot_reason(row["kernel"], row["dtype"], row["arch"])):
            found.append(f"spill in a hot kernel: {where} {_config_text(row)}: stack {row['stack']} B, "
                         f"{row['local_stores']} local stores, {row['local_loads']} local loads "
                         f"(hot because {reason})")
    return found


def _config_text(row: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    parts = [f"{short.get(k, k.replace('BLOCK_', ''))}{v}" for k, v in row.get("config", {}).items()]
    parts += [k.lower() for k, v in row.get("flags", {}).items() if v]
    return " ".join(parts)


def _precision_text(row: dict) -> str:
    """The tl.dot input precision where it applies (float32 inputs); 16-bit inputs multiply natively."""
    if not row.get("dot_precision"):
        return ""
    return row["dot_precision"] if row["dtype"] == "float32" else "native"


def markdown(arch: str, rows: list[dict], found: list[str], meta: dict) -> str:
    lines = [f"# Compile report, {arch}",
             "",
             f"`{meta['command']}` on {meta['date']} (git {meta['git']}, Triton {meta['triton']}, "
             f"torch {meta['torch']}); no GPU: compiled for the target, not run. "
             "Regs: registers per thread; smem: shared memory per block (bytes; for the cuda kernels "
             "only the static part, their dynamic shared memory is sized at launch); stack: stack frame "
             "(bytes); local st/ld: local-memory instructions (spills); prec: tl.dot input precision; "
             "wgmma/mma: tensor-core instructions; 16B/narrow: global loads 16 bytes wide / narrower; "
             "at: the sizes whose launches compile to this kernel (paper, tests). HOT kernels must not "
             "spill (tools/compile_report.py, HOT).",
             ""]
    lines += ["## Verdict", ""]
    lines += [f"- {line}" for line in found] or ["- no compile errors, no spills in hot kernels"]
    lines += ["", "## Hot kernels (must not spill here)", ""]
    lines += [f"- {name} ({', '.join(dtypes)}): {reason}" for name, dtypes, archs, reason in HOT if arch in archs]
    lines += ["", "| kernel | dtype | drop | config | prec | regs | smem | stack | local st/ld | "
              "wgmma | mma | 16B | narrow | instr | at | hot |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        hot = "yes" if hot_reason(row["kernel"], row["dtype"], row["arch"]) else ""
        if "error" in row:
            lines.append(f"| {row['kernel']} | {row['dtype']} | {'p' if row['dropout'] else ''} | "
                         f"{_config_text(row)} | | **error** | | | | | | | | | "
                         f"{','.join(row['used_at'])} | {hot} |")
            continue
        lines.append(
            f"| {row['kernel']} | {row['dtype']} | {'p' if row['dropout'] else ''} | {_config_text(row)} | "
            f"{_precision_text(row)} | {row['registers']} | {row['shared']} | {row['stack']} | "
            f"{row.get('local_stores', '')}/{row.get('local_loads', '')} | {row.get('wgmma', '')} | "
            f"{row.get('mma', '')} | {row.get('loads_16B', '')} | {row.get('loads_narrow', '')} | "
            f"{row.get('instructions', '')} | {','.join(row['used_at'])} | {hot} |")
    if meta.get("cuda_note"):
        lines += ["", f"CUDA kernels: {meta['cuda_note']}"]
    return "\n".join(lines) + "\n"


def _git_revision() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCH_NAMES),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS),
                        help="which ops' Triton kernels (default: all)")
    parser.add_argument("--sizes", nargs="+", default=["paper", "tests"], choices=["paper", "tests"],
                        help="the paper's sizes, the sizes the GPU tests use, or both (default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for compile_<arch>.md and .json (default: benchmarks/results)")
    parser.add_argument("--list", action="store_true",
                        help="only list the distinct launches the launchers make, compile nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compilations (default: every CPU)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_report: unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    try:
        nvidia_tool("cuobjdump")
    except FileNotFoundError as err:
        print(f"compile_report: {err}", file=sys.stderr)
        return 2

    import torch
    import triton

    from sharnn_fast._files import write_atomically
    started = time.perf_counter()
    jobs = collect_jobs(args.ops, args.sizes)
    print(f"compile_report: {len(jobs)} distinct Triton launches x {len(args.arch)} archs, "
          f"{args.jobs} processes", flush=True)
    if args.list:
        for job in jobs:
            print(f"  {job.launch.name} {job.dtype}{' dropout' if job.dropout else ''} "
                  f"at {','.join(sorted(job.used_at))}: {job.launch.configuration()[2]}")
        return 0
    rows = compile_all(jobs, args.arch, args.jobs)
    cuda, cuda_note = cuda_rows(args.arch)
    rows += cuda
    rows.sort(key=lambda r: (r["kind"] != "triton", r["op"], r["kernel"], r["dtype"], r["dropout"],
                             r.get("registers", 0)))
    arguments = sys.argv[1:] if argv is None else argv
    meta = dict(command=" ".join(["python tools/compile_report.py", *arguments]),
                date=time.strftime("%Y-%m-%d"), git=_git_revision(), triton=triton.__version__,
                torch=torch.__version__, cuda_note=cuda_note, hot=[list(h) for h in HOT])
    all_found = []
    for arch in args.arch:
        name = ARCH_NAMES[arch]
        arch_rows = [r for r in rows if r["arch"] == name]
        found = findings(arch_rows)
        all_found += found
        stem = f"compile_sm{arch}"
        write_atomically(args.out / f"{stem}.md", markdown(name, arch_rows, found, meta))
        write_atomically(args.out / f"{stem}.json",
                         json.dumps(dict(meta, arch=name, findings=found, kernels=arch_rows), indent=1) + "\n")
        print(f"compile_report: {name}: {len(arch_rows)} kernels, {len(found)} findings -> "
              f"{args.out / (stem + '.md')}")
    if cuda_note:
        print(f"compile_report: CUDA kernels not reported: {cuda_note}")
    for line in all_found:
        print(f"  {line}")
    print(f"compile_report: {'FAILED' if all_found else 'ok'} in {time.perf_counter() - started:.0f} s")
    return 1 if all_found else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # a tool error, not a finding: one line, the traceback on request
        if os.environ.get("SHARNN_DEBUG") == "1":
            raise
        print(f"compile_report: internal error: {type(err).__name__}: {err} "
              "(set SHARNN_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
