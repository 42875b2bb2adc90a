#!/usr/bin/env bash
# One GPU session in one command of at most 8 minutes on one H100/H200: environment facts, the CUDA build for the
# visible GPU, GPU tests (CUDA kernels + Triton backend vs the float64 oracle), the decode benchmark (cuda vs triton
# vs the PEFT path) and `fastprompt bench --device cuda --quick`. Everything lands in one folder, $OUT, with
# SUMMARY.txt saying what ran, how long each stage took, and what was skipped to fit the budget.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # budget 480 s (BUDGET_S to change it)
#
# Stages in order of value; each runs under `timeout` with what is left of the budget, and a stage that cannot get
# its minimum is skipped and listed. What is skipped by design to fit: the compile report (CPU-only information, CI
# has it), the full `fastprompt bench` (--quick instead), the `slow`-marked tests.
# Exit status: that of the GPU tests, 3 when they were skipped (the benchmarks never fail the session).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out/gpu_session}
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-480}
START=$(date +%s)
mkdir -p "$OUT"
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

stage() {  # name, minimum seconds, command...
  local name=$1 need=$2; shift 2
  local remaining; remaining=$(left)
  if (( remaining < need )); then
    note "SKIPPED $name: ${remaining}s left of ${BUDGET_S}s, needs ${need}s"
    return 3
  fi
  local t0; t0=$(date +%s)
  timeout "$remaining" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc in $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (TIMED OUT: cut by the budget)')"
  tail -25 "$OUT/$name.log"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()) if torch.cuda.is_available() else print('NO CUDA DEVICE')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The build: setup.py compiles for the visible GPU's architecture only (a few minutes less than sm_80 + sm_90).
if ! "$PY" -c "import fastprompt._C" > /dev/null 2>&1; then
  stage build 120 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || { note "BUILD FAILED (see build.log)"; exit 1; }
fi
"$PY" -c "from fastprompt._cuda_build_info import cuda_info_text; print(cuda_info_text())" > "$OUT/cuda_info.txt" 2>&1
cat "$OUT/cuda_info.txt"

stage gpu_tests 90 "$PY" -m pytest tests/test_cuda_build.py tests/test_cuda_kernels.py tests/test_integration_cuda.py \
  -m "not slow" -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
rc_tests=$?

stage decode_bench 60 "$PY" benchmarks/bench_decode_cuda.py --out "$OUT" --quick
stage fastprompt_bench 90 "$PY" -m fastprompt bench --device cuda --quick --no-progress --out "$OUT/bench"
note "SKIPPED compile_report: CPU-side facts, produced by CI (benchmarks/cuda_compile_report.md)"

note "gpu_session: tests exit $rc_tests; $(( $(date +%s) - START ))s of ${BUDGET_S}s; results in $OUT"
exit "$rc_tests"
