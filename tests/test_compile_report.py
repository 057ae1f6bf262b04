"""tools/compile_report.py: its verdict, its reading of cuobjdump's names, and that it records the
launches the launchers make (CI runs the whole report; these check its parts in seconds)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "compile_report.py"
_spec = importlib.util.spec_from_file_location("compile_report", SCRIPT)
report = importlib.util.module_from_spec(_spec)
sys.modules["compile_report"] = report  # its dataclasses look their module up there
_spec.loader.exec_module(report)


def row(kernel, dtype="bfloat16", arch="sm_90a", **figures):
    base = dict(kernel=kernel, dtype=dtype, arch=arch, dropout=False, config={}, flags={}, registers=64,
                shared=49152, stack=0, local=0, local_stores=0, local_loads=0)
    return dict(base, **figures)


def test_a_spill_fails_only_in_a_hot_kernel_and_names_the_reason():
    rows = [row("boom_bwd_dz_kernel", stack=16, local_stores=3, local_loads=3),
            row("attention_bwd_dq_kernel", dtype="float32", stack=120, local_stores=9),  # not hot in fp32
            row("boom_fwd_kernel", arch="sm_80", stack=32, local_stores=5),  # hot on sm_90a only
            row("lstm_fwd_step_kernel")]
    found = report.findings(rows)
    assert len(found) == 1 and found[0].startswith("spill in a hot kernel: boom_bwd_dz_kernel sm_90a")
    assert "hot because" in found[0] and "stack 16 B" in found[0]


def test_shared_memory_over_the_arch_limit_fails_in_any_kernel():
    # 200 KB fits an H200's 227 KB per block, not an A100's 163 KB.
    found = report.findings([row("attention_bwd_delta_kernel", arch=arch, shared=200 * 1024)
                             for arch in ("sm_90a", "sm_80")])
    assert len(found) == 1 and found[0].startswith("shared memory over the limit: attention_bwd_delta_kernel sm_80")


def test_a_compile_error_always_fails():
    found = report.findings([dict(row("attention_fwd_kernel", dtype="float32"), error="CompilationError: x")])
    assert found == ["compile error: attention_fwd_kernel sm_90a float32: CompilationError: x"]


@pytest.mark.parametrize("mangled, expected", [
    ("_ZN6sharnn4lstm51_GLOBAL__N__e5e08953_18_lstm_recurrence_cu_ec2c2e4415lstm_fwd_kernelI13"
     "__nv_bfloat16EEvNS1_13ForwardParamsE", ("lstm_fwd_kernel", "bfloat16")),
    ("_ZN6sharnn4lstm51_GLOBAL__N__e5e08953_18_lstm_recurrence_cu_ec2c2e4415lstm_bwd_kernelIfEEvNS1_"
     "14BackwardParamsE", ("lstm_bwd_kernel", "float32")),
    ("_ZN6sharnn4lstm15lstm_fwd_kernelI6__halfEEvv", ("lstm_fwd_kernel", "float16")),
    ("_ZN6sharnn21add_scalar_f32_kernelEPfPKflf", ("add_scalar_f32_kernel", "")),
])
def test_cuda_kernel_names(mangled, expected):
    assert report._cuda_kernel_name(mangled) == expected


def test_every_hot_entry_names_a_kernel_dtypes_archs_and_a_reason():
    for name, dtypes, archs, reason in report.HOT:
        assert name.endswith("_kernel") and reason
        assert set(dtypes) <= set(report.DTYPE_NAMES) and set(archs) <= set(report.ARCH_NAMES.values())


def test_lists_the_launches_the_boom_launchers_make():
    """In a process without TRITON_INTERPRET (the kernels must be the compiled kind): the forward and
    the dz kernel in every dtype, with and without dropout, with the launchers' GPU block sizes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--list", "--ops", "boom", "--sizes", "paper"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ")]
    for kernel in ("boom_fwd_kernel", "boom_bwd_dz_kernel"):
        for dtype in report.DTYPE_NAMES:
            for dropout in ("", " dropout"):
                assert any(line.startswith(f"{kernel} {dtype}{dropout} at paper:") for line in lines), \
                    (kernel, dtype, dropout, lines)
    assert len(lines) == 12  # the paper's size has a bias: one launch per (kernel, dtype, dropout)
    assert any("('BLOCK_N', 64)" in line and "('DROPOUT', True)" in line and "boom_bwd_dz" in line
               for line in lines)
