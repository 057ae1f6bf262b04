#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see README, "Building for a GPU").
#
#   tools/gpu_check.sh OUT_DIR
#
# Builds and installs the package there (offline), runs the GPU-marked tests, then the benchmarks
# at the paper's sizes; full logs and results go to OUT_DIR, a short table is printed last.
# Budget: well under 10 minutes on an H100.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# -P: never import the source tree from the working directory, always the installed package.
py="python3 -P"
started=$(date +%s)

echo "== build"
if ! python3 -m pip install --no-build-isolation --no-deps . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; echo "BUILD FAILED (full log: $out/build.log)"; exit 1
fi
$py -c "import json, sharnn_fast; print(json.dumps(sharnn_fast.build_info(), indent=1))" \
  | tee "$out/build_info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  >"$out/gpu.csv" 2>&1

echo "== GPU tests"
timeout 240 $py -m pytest tests/ -m gpu -q -rfEs -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/gpu_tests.log"

echo "== benchmarks"
timeout 360 $py -m pytest benchmarks/ -q -p no:cacheprovider >"$out/benchmarks.log" 2>&1
bench_rc=$?
# At most 8 files come back from a lent machine: the five logs above and this run's results.
new_results=$(ls -t benchmarks/results/*.json 2>/dev/null | head -n 1)
[ -n "$new_results" ] && cp -p "$new_results" "${new_results%.json}.md" "$out/"

echo "== summary ($(( $(date +%s) - started )) s)"
$py -c "import sharnn_fast; i = sharnn_fast.build_info(); print('build: cuda', i['cuda'], i['cuda_archs'], 'devices', i['cuda_devices'])"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1
sed -n '/sharnn_fast results/,/written to/p' "$out/benchmarks.log"
echo "tests rc=$tests_rc benchmarks rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
