#!/usr/bin/env bash
# One GPU session in one command: environment facts, build check, GPU tests (CUDA kernels + Triton backend vs the
# float64 oracle), compile report, decode benchmark (cuda vs triton vs the PEFT path). Everything lands in $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--quick]
#
# Exit status: that of the GPU tests (the benchmark never fails the session).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out/gpu_session}
PY=${PYTHON:-python}
QUICK=${1:-}
mkdir -p "$OUT"

{
  date -u
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import fastprompt._C" > /dev/null 2>&1; then
  echo "fastprompt._C missing: building (pip install --no-build-isolation --no-deps -e .)"
  MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
    echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "from fastprompt._cuda_build_info import cuda_info_text; print(cuda_info_text())" | tee "$OUT/cuda_info.txt"

"$PY" -m pytest tests/test_cuda_build.py tests/test_cuda_kernels.py -q -rs -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}

"$PY" benchmarks/cuda_compile_report.py --out "$OUT/cuda_compile_report.md" > "$OUT/cuda_compile_report.log" 2>&1 || true
"$PY" benchmarks/bench_decode_cuda.py --out "$OUT" $QUICK 2>&1 | tee "$OUT/decode_bench.log" || true

echo "gpu_session: tests exit $rc_tests; results in $OUT"
exit "$rc_tests"
