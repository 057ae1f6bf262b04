#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see README, "Building for a GPU").
#
#   tools/gpu_check.sh OUT_DIR
#
# Builds and installs the package there (offline), runs the GPU-marked tests, the op and model
# benchmarks at the paper's sizes and a short bf16 convergence check. Full logs and results go to
# OUT_DIR (at most 8 files: a lent machine returns no more), a short table is printed last. Each
# phase has its own time limit, so the whole stays under 9 minutes; benchmark results are written
# after every case, so a phase cut short still returns what it measured.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# -P: never import the source tree from the working directory, always the installed package.
py="python3 -P"
started=$(date +%s)
summary="$out/summary.txt"
: >"$summary"

phase() { echo "== $1 ($(( $(date +%s) - started )) s)" | tee -a "$summary"; }

phase build
if ! python3 -m pip install --no-build-isolation --no-deps . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; echo "BUILD FAILED (full log: $out/build.log)"; exit 1
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $py -c "import sharnn_fast; i = sharnn_fast.build_info(); print('build: cuda', i['cuda'], i['cuda_archs'], 'kernels', i['kernels'], 'devices', i['cuda_devices'])"
} 2>&1 | tee -a "$summary"

phase "GPU tests"
timeout 200 $py -m pytest tests/ -m gpu -q -rfEs -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$out/gpu_tests.log" | tee -a "$summary"

phase benchmarks
# Ops first (each is quick), then the model; one session, so one results file.
timeout 240 $py -m pytest benchmarks/bench_boom.py benchmarks/bench_attention.py \
  benchmarks/bench_lstm.py benchmarks/bench_model.py -q -p no:cacheprovider >"$out/benchmarks.log" 2>&1
bench_rc=$?
new_results=$(ls -t benchmarks/results/2*.json 2>/dev/null | head -n 1)
[ -n "$new_results" ] && cp -p "$new_results" "${new_results%.json}.md" "$out/"

phase "convergence (bf16)"
timeout 50 $py tools/convergence.py --device cuda --dtype bfloat16 --steps 150 >>"$summary" 2>&1
conv_rc=$?
cp -p benchmarks/results/convergence_*bfloat16.json benchmarks/results/convergence_*bfloat16.png "$out/" 2>/dev/null

phase summary
{
  grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1
  [ -n "$new_results" ] && sed -n '/^| group/,$p' "${new_results%.json}.md"
  echo "tests rc=$tests_rc benchmarks rc=$bench_rc convergence rc=$conv_rc"
} | tee -a "$summary"
exit $(( tests_rc != 0 || bench_rc != 0 || conv_rc != 0 ))
