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
timeout 240 $py -m pytest tests/ -m gpu -q -rfEs -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml" >"$out/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/gpu_tests.log"

echo "== benchmarks"
timeout 360 $py -m pytest benchmarks/ -q -p no:cacheprovider \
  --benchmark-json="$out/pytest_benchmark.json" >"$out/benchmarks.log" 2>&1
bench_rc=$?
cp -p benchmarks/results/*.md benchmarks/results/*.json "$out/" 2>/dev/null

echo "== summary ($(( $(date +%s) - started )) s)"
$py - "$out" <<'PY'
import json, pathlib, sys
import sharnn_fast
info = sharnn_fast.build_info()
print(f"build: cuda={info.get('cuda')} archs={info.get('cuda_archs')} devices={info.get('cuda_devices')}")
PY
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1
sed -n '/sharnn_fast results/,/written to/p' "$out/benchmarks.log"
echo "tests rc=$tests_rc benchmarks rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
