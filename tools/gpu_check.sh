#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (README, "Building for a GPU"): in one call it
# builds, smoke-tests, runs every GPU-capable test, the compute-sanitizer checks and the
# benchmarks, and prints a summary last.
#
#   tools/gpu_check.sh OUT_DIR            on the GPU machine, e.g. in a device `run`: tools/gpu_check.sh $OUT
#   tools/gpu_check.sh --dry-run OUT_DIR  on a CPU-only machine: every phase with the CPU fallbacks
#                                         (.ci/run does this, so the script cannot rot unnoticed)
#
# Made for one H200 with Python 3.12, torch 2.11, Triton 3.6, nvcc 13, 16 cores and no network; the
# whole run stays under 8 minutes (the lease is 15 minutes for every try together). Every phase has
# its own cap and the caps add up to 8.3 minutes (8.8 when the fallback build runs), expected times
# on that machine in brackets (build and smoke measured on an H200 on 2026-12-04: 37 s and 26 s):
#   build      [~45 s, cap 90 s]   pip install --no-build-isolation --no-deps . for sm_90a only; if it
#                                  fails, a build without the CUDA kernels, so the Triton phases still run
#   smoke      [~30 s, cap 45 s]   tools/gpu_smoke.py: one tiny call per (op, backend) with a
#                                  synchronize, then the paper-size bf16 cuda LSTM 10 times, bitwise
#   tests      [~140 s, cap 150 s] one pytest process per test file (`-m gpu`: every GPU-capable test),
#                                  4 at a time (the Triton-heavy files first, each with 3 xdist workers:
#                                  compiling kernels is what takes the time), each under `timeout -k`
#                                  (an illegal address or a hung grid.sync costs one file), plus the
#                                  cuda LSTM tests under compute-sanitizer memcheck and racecheck at
#                                  small sizes
#   op benchmarks    [~100 s, caps 70/20/45 s]  benchmarks/bench_{attention,boom,lstm}.py at the paper's
#                                  sizes, one process per file, each under its own cap
#   model benchmark  [~50 s, cap 80 s]  benchmarks/bench_model.py without the torch.compile cases
#   summary    [~2 s]              device, versions, tests passed/failed per file, smoke results and the
#                                  headline table, printed last
# The dry run takes the same path on smaller selections (the five GPU-heavy test files, the Boom
# benchmark, one model case, all untimed), so that it stays a CI step of about two minutes.
# Results: the benchmark files each benchmark run wrote (newer than a stamp file touched just before
# it, so results committed earlier are never taken for new ones), kept as attention_*, boom_*, lstm_*
# and model_*. OUT_DIR receives at most 6 files: summary.txt, logs.tar.gz (every log, smoke.json, the
# new results' .json and .md) and the new results' .md.
# Exit status: 0 if every phase passed, 1 otherwise, 2 on bad arguments.
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: tools/gpu_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# -P: never import the source tree from the working directory, always the installed package.
pyP="$py -P"
work=$(mktemp -d)
logs=$work/logs
mkdir -p "$logs"
stamp=$work/stamp
started=$(date +%s)
failed_phases=()

elapsed() { echo $(( $(date +%s) - started )); }
phase() { echo "== $1 (at $(elapsed) s)" | tee -a "$logs/phases.txt"; }
fail() { failed_phases+=("$1"); echo "   FAILED: $1" | tee -a "$logs/phases.txt"; }
# capped SECONDS LOG CMD...: CMD under `timeout -k`, output to LOG; says so when the cap was hit.
capped() {
  local cap=$1 log=$2; shift 2
  timeout -k 10 "$cap" "$@" >"$log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMEOUT after ${cap} s: $*" >>"$log"; fi
  return $rc
}

# ---- build [~45 s, cap 90 s] ------------------------------------------------------------------
phase build
if [ $dry_run -eq 1 ]; then
  # CPU fallback: build a wheel without the CUDA kernels (nothing is installed over this checkout's
  # environment); needs the build requirements here, as --no-build-isolation does on the GPU machine.
  if $py -c "import pybind11, setuptools" 2>/dev/null && command -v cmake >/dev/null && command -v ninja >/dev/null; then
    SHARNN_DISABLE_CUDA=1 MAX_JOBS=2 capped 90 "$logs/build.log" \
      $py -m pip wheel --no-build-isolation --no-deps --wheel-dir "$work/wheel" . || fail build
  else
    echo "dry run: build skipped (needs pybind11, setuptools, cmake and ninja here)" | tee "$logs/build.log"
  fi
elif ! SHARNN_CUDA_ARCHS=90a-real SHARNN_REQUIRE_CUDA=1 MAX_JOBS=16 capped 90 "$logs/build.log" \
    $py -m pip install --no-build-isolation --no-deps .; then
  fail build
  tail -n 30 "$logs/build.log"
  # Without the CUDA kernels every Triton phase still has something to find.
  SHARNN_DISABLE_CUDA=1 MAX_JOBS=16 capped 30 "$logs/build_without_cuda.log" \
    $py -m pip install --no-build-isolation --no-deps . || fail "build without CUDA"
fi
{
  if [ $dry_run -eq 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    nvcc --version | tail -n 1
  fi
  $pyP -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $pyP -c "import sharnn_fast; i = sharnn_fast.build_info(); print('build: cuda', i['cuda'], i['cuda_archs'] or i['cuda_reason'], 'kernels', i['kernels'], 'devices', i['cuda_devices'])"
} >"$logs/versions.txt" 2>&1

# ---- smoke [~30 s, cap 45 s] ------------------------------------------------------------------
phase smoke
device=cuda
[ $dry_run -eq 1 ] && device=cpu
capped 45 "$logs/smoke.log" $pyP tools/gpu_smoke.py --device $device --json "$logs/smoke.json" || fail smoke

# ---- tests [~140 s, cap 150 s] ------------------------------------------------------------------
phase tests
tests_deadline=$(( $(date +%s) + 150 ))
per_file_cap=140
plugins=()
# pytest-timeout loads itself through its entry point; naming it with -p as well stops pytest at
# start-up ("Plugin already registered"), which cost the first GPU run every test. Only when plugin
# autoloading is off does it need -p.
if $py -c "import pytest_timeout" 2>/dev/null; then
  if [ -n "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ]; then plugins+=(-p pytest_timeout); fi
  plugins+=(--timeout 100)
fi
workers=()
$py -c "import xdist" 2>/dev/null && workers=(-n 3)
# The GPU-heavy files first (they compile the most Triton kernels), so the 4 slots stay busy.
heavy=(tests/ops/test_lstm_triton.py tests/ops/test_attention_triton.py tests/ops/test_lstm_cuda.py
       tests/ops/test_boom_triton.py tests/test_model.py)
if [ $dry_run -eq 1 ]; then
  test_files=("${heavy[@]}")
else
  mapfile -t test_files < <( { printf '%s\n' "${heavy[@]}"; find tests -name 'test_*.py' | sort; } | awk '!seen[$0]++')
fi
run_test_file() {  # FILE LOG [extra pytest arguments]: one pytest process, capped by the phase deadline
  local file=$1 log=$2; shift 2
  local cap=$(( tests_deadline - $(date +%s) ))
  (( cap > per_file_cap )) && cap=$per_file_cap
  if (( cap < 10 )); then echo "NOT RUN: the tests phase's time was spent" >"$log"; return 0; fi
  # -v: one line per test, so a file cut off by its cap still shows what passed and failed.
  capped "$cap" "$log" $pyP -m pytest "$file" -m gpu -v -rfE -p no:cacheprovider "${plugins[@]}" "$@"
  echo "exit status $?" >>"$log"
}
for file in "${test_files[@]}"; do
  [ -f "$file" ] || continue
  while (( $(jobs -rp | wc -l) >= 4 )); do wait -n; done
  case " ${heavy[*]} " in *" $file "*) extra=("${workers[@]}") ;; *) extra=() ;; esac
  run_test_file "$file" "$logs/test_$(basename "$file" .py).log" "${extra[@]}" &
done
# The cuda LSTM kernels under compute-sanitizer (memcheck and racecheck, small sizes), in the same slots.
while (( $(jobs -rp | wc -l) >= 4 )); do wait -n; done
SHARNN_SANITIZER=1 run_test_file tests/ops/test_lstm_cuda.py "$logs/test_compute_sanitizer.log" -k compute_sanitizer &
wait
# Per file: pytest's last line; exit status 5 (nothing selected) means the file has no GPU tests.
: >"$logs/tests_summary.txt"
for log in "$logs"/test_*.log; do
  name=$(basename "$log" .log); name=${name#test_}
  status=$(sed -n 's/^exit status //p' "$log" | tail -n 1)
  result=$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)|no tests ran' "$log" \
    | tail -n 1 | tr -d '=')
  if grep -q "^TIMEOUT" "$log"; then
    result="TIMEOUT after $(grep -c ' PASSED' "$log") passed, $(grep -c ' FAILED' "$log") failed"
  fi
  grep -q "^NOT RUN" "$log" && result="NOT RUN (phase time spent)" && status=1
  printf '%-28s %s\n' "$name" "${result:-no result (exit status ${status:-?})}" >>"$logs/tests_summary.txt"
  case "${status:-1}" in 0|5) ;; *) fail "tests: $name" ;; esac
done

# ---- op benchmarks [~100 s, caps 70 + 20 + 45 s], model benchmark [~50 s, cap 80 s] -----------
# One pytest process per benchmark file, each under its own cap, so a slow or failing file costs
# only itself; the conftest prints every failure as it happens (a capped run keeps its reasons).
# --case-budget and --min-rounds keep every case short enough for the lease: medians of at least 5
# rounds, timed interleaved, and their IQR.
bench_args=(-q -p no:cacheprovider)
op_args=(--case-budget 1.5 --min-rounds 5)
model_args=(--case-budget 4 --min-rounds 5)
# file:cap, the one this issue's choices rest on first
op_benchmarks=(benchmarks/bench_attention.py:70 benchmarks/bench_boom.py:20 benchmarks/bench_lstm.py:45)
# The paper-size model cases: train step with single-head attention and with attention in every
# block, and an inference segment. torch.compile's cases (minutes of compilation each) do not fit
# this lease: run them on their own (`pytest benchmarks/bench_model.py -k compile`).
model_cases="not compile"
model_cap=80
if [ $dry_run -eq 1 ]; then  # untimed, as CI runs them (nothing is written to results/ then)
  bench_args+=(--benchmark-disable)
  op_args=()
  model_args=()
  op_benchmarks=(benchmarks/bench_boom.py:60)
  model_cases="inference_segment and not compile"
  model_cap=150  # one untimed CPU case with its set-up takes 25-45 s on 2 shared cores
fi
results=$work/results
mkdir -p "$results"
# Each run names its files by date, device and git revision, so the model run would overwrite the op
# run's: take what a run wrote (newer than the stamp) under a prefix, then stamp again.
take_results() {
  find benchmarks/results -maxdepth 1 -newer "$stamp" -type f \( -name '*.json' -o -name '*.md' \) \
    ! -name 'compile_*' | while read -r f; do cp -p "$f" "$results/$1_$(basename "$f")"; done
  touch "$stamp"
}
phase "op benchmarks"
for entry in "${op_benchmarks[@]}"; do
  file=${entry%:*}; cap=${entry##*:}; name=$(basename "$file" .py)
  touch "$stamp"
  capped "$cap" "$logs/$name.log" $pyP -m pytest "$file" "${bench_args[@]}" "${op_args[@]}" || fail "$name"
  take_results "${name#bench_}"
done
phase "model benchmark"
touch "$stamp"
capped $model_cap "$logs/bench_model.log" $pyP -m pytest benchmarks/bench_model.py -k "$model_cases" \
  "${bench_args[@]}" "${model_args[@]}" || fail "model benchmark"
take_results model
mapfile -t new_results < <(find "$results" -type f | sort)

# ---- summary [~2 s]: OUT_DIR gets summary.txt, logs.tar.gz and the new results' .md (at most 4) -------------
phase summary
summary=$work/summary.txt
{
  echo "gpu_check$([ $dry_run -eq 1 ] && echo ' --dry-run (CPU fallbacks)'): $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(elapsed) s"
  cat "$logs/versions.txt"
  echo "-- phases"; cat "$logs/phases.txt"
  echo "-- smoke"; grep -E "^smoke" "$logs/smoke.log" || tail -n 5 "$logs/smoke.log"
  echo "-- tests (per file: pytest's last line)"; cat "$logs/tests_summary.txt"
  echo "-- new benchmark results"
  if [ ${#new_results[@]} -eq 0 ]; then echo "none written"; fi
  for f in "${new_results[@]}"; do
    echo "$(basename "$f")"
    case "$f" in *.md) grep -E '^\|' "$f" | head -n 40 ;; esac
  done
  echo "-- failures (tests: the first 40; benchmarks: each as it happened, first lines)"
  grep -h -E "(FAILED|ERROR)( |$)" "$logs"/test_*.log 2>/dev/null | grep -v "^=" | head -n 40
  for log in "$logs"/bench_*.log; do
    [ -f "$log" ] || continue
    grep -A 12 "^---- FAILED" "$log" | grep -v "^\s*$" | head -n 40
    grep -h "^TIMEOUT" "$log"
  done
  if [ ${#failed_phases[@]} -eq 0 ]; then echo "RESULT: every phase passed"
  else echo "RESULT: FAILED: ${failed_phases[*]}"; fi
} >"$summary" 2>&1
cp -p "$summary" "$out/summary.txt"
for f in "${new_results[@]}"; do case "$f" in *.md) cp -p "$f" "$out/" ;; esac; done  # .json: in logs.tar.gz
tar -czf "$out/logs.tar.gz" -C "$work" logs results summary.txt
rm -rf "$work"
cat "$out/summary.txt"
[ ${#failed_phases[@]} -eq 0 ]
