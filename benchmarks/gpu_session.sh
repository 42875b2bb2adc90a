#!/usr/bin/env bash
# One GPU session in one command of at most 8 minutes on one H100/H200: environment facts, the newer Hugging Face
# stack from wheels brought along, the CUDA build for the visible GPU, GPU tests (CUDA kernels + the compiled
# Triton backend vs the float64 oracle), the decode benchmark (cuda vs triton vs the PEFT path),
# `fastprompt bench --device cuda --quick` and its vision rows (`--vision`). Everything lands in one folder, $OUT, with SUMMARY.txt saying what ran,
# how long each stage took, and what was skipped to fit the budget.
#
#   bash benchmarks/gpu_wheels.sh                     # here, where the package index is reachable: fills .whl/
#   OUT=/some/dir bash benchmarks/gpu_session.sh      # there (the device run carries ".whl"); budget 480 s
#
# The GPU image is fixed and offline (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0). The
# install stage upgrades transformers and peft from the wheels in .whl/ (WHEELS to change the folder) with
# `pip install --no-index`; fastprompt itself goes in with --no-deps (torch and triton stay the image's). Without
# wheels the image's own packages are used where fastprompt's floors (fastprompt/_versions.py) allow them, and the
# session stops, naming the package, where they do not. Without a CUDA device (the CI rehearsal,
# .ci/gpu_image_lane.sh) the stages up to the install run and the GPU stages are skipped.
#
# Stages in order of value; each runs under `timeout` with what is left of the budget, and a stage that cannot get
# its minimum is skipped and listed. What is skipped by design to fit: the compile report (CPU-only information, CI
# has it), the full `fastprompt bench` (--quick instead), the `slow`-marked tests.
# Exit status: that of the GPU tests; 3 when they were skipped (no GPU, or no time left); 2 when an install or the
# build failed, or the versions are older than fastprompt's floors. The benchmarks never fail the session.
set -uo pipefail
cd "$(dirname "$0")/.."
# This checkout's fastprompt for every stage, installed or not: with a carried, prebuilt fastprompt._C nothing is
# pip-installed, and `python benchmarks/bench_decode_cuda.py` puts benchmarks/, not the root, on sys.path (the H100
# session of 2026-12-05 lost its decode stage to that).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/bench_out/gpu_session}
PY=${PYTHON:-python3}  # the image's python3 is the one that holds torch
WHEELS=${WHEELS:-$PWD/.whl}
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
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()) if torch.cuda.is_available() else print('NO CUDA DEVICE')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The newer pure-Python stack: pip upgrades transformers and peft to the brought versions and takes a brought
# dependency only where the image's version does not satisfy them (--no-index: nothing else is reachable;
# --no-compile: with every module byte-compiled up front these wheels took 154 s to install on the CPU machine, 18 s
# without; Python then compiles only the modules a run imports).
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  stage install_wheels 30 "$PY" -m pip install --no-index --no-compile --find-links "$WHEELS" --upgrade transformers peft \
    || { note "STOPPED: the wheels in $WHEELS do not install on this image (install_wheels.log)"; exit 2; }
else
  note "no wheels in $WHEELS (benchmarks/gpu_wheels.sh makes them): the image's own transformers and peft are used"
fi

# fastprompt's floors against what is installed now: a package older than its floor stops the session, by name.
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PYEOF'
import sys

sys.path.insert(0, ".")
from fastprompt._versions import TESTED_RANGES, below_floors, installed_versions, range_status

for name, version in installed_versions().items():
    low, high = TESTED_RANGES[name]
    print(f"{name} {version or '-'}: {range_status(name, version)} ({low} - {high})")
too_old = below_floors()  # an optional package (timm) may be absent: the GPU image has none
if too_old:
    print("too old for fastprompt: " + "; ".join(too_old) + ". Bring wheels: bash benchmarks/gpu_wheels.sh")
    sys.exit(2)
PYEOF
rc_versions=$?
tee -a "$SUMMARY" < "$OUT/versions.txt"
(( rc_versions == 0 )) || { note "STOPPED: installed versions are older than fastprompt's floors (above)"; exit 2; }

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
  # No GPU (the CI rehearsal): the pure-Python install and `fastprompt info`; nothing that needs CUDA.
  stage install_fastprompt 60 env FASTPROMPT_CUDA_BUILD=0 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || { note "STOPPED: fastprompt does not install (install_fastprompt.log)"; exit 2; }
  stage info 30 "$PY" -m fastprompt info
  note "SKIPPED build, gpu_tests, decode_bench, fastprompt_bench, vision_bench: no CUDA device"
  note "gpu_session: no GPU, install rehearsed in $(( $(date +%s) - START ))s; results in $OUT"
  exit 3
fi

# The build: setup.py compiles for the visible GPU's architecture only (a few minutes less than sm_80 + sm_90).
# (torch first: the extension links against libc10, which only `import torch` loads. A _C built elsewhere for this
# image's torch, e.g. here with TORCH_CUDA_ARCH_LIST=9.0 and carried, saves the build's minutes of device time.)
if ! "$PY" -c "import torch, fastprompt._C" > /dev/null 2>&1; then
  stage build 120 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || { note "BUILD FAILED (see build.log)"; exit 2; }
fi
"$PY" -c "from fastprompt._cuda_build_info import cuda_info_text; print(cuda_info_text())" > "$OUT/cuda_info.txt" 2>&1
cat "$OUT/cuda_info.txt"

# TRITON_INTERPRET=0: the tests' conftest defaults it to 1 for the CPU lanes; here the Triton kernels compile.
# Compiling them is CPU-bound and one process compiles one kernel at a time: with pytest-xdist (the image has it)
# GPU_TEST_WORKERS processes share the 16 cores and the one GPU.
workers=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then workers=(-n "${GPU_TEST_WORKERS:-8}"); fi
stage gpu_tests 90 env TRITON_INTERPRET=0 "$PY" -m pytest tests/test_cuda_build.py tests/test_cuda_kernels.py \
  tests/test_integration_cuda.py -m "not slow" -q -rs -p no:cacheprovider "${workers[@]}" --junitxml "$OUT/gpu_tests.xml"
rc_tests=$?

stage decode_bench 60 "$PY" benchmarks/bench_decode_cuda.py --out "$OUT" --quick
stage fastprompt_bench 90 "$PY" -m fastprompt bench --device cuda --quick --no-progress --out "$OUT/bench"
# the vision continual-learning rows (DualPrompt / CODA-Prompt on ViT-B/16, B=32 on a GPU; fastprompt/bench/cases_vision.py)
stage vision_bench 60 "$PY" -m fastprompt bench --device cuda --vision --no-progress --out "$OUT/bench_vision"
note "SKIPPED compile_report: CPU-side facts, produced by CI (benchmarks/cuda_compile_report.md)"

note "gpu_session: tests exit $rc_tests; $(( $(date +%s) - START ))s of ${BUDGET_S}s; results in $OUT"
exit "$rc_tests"
