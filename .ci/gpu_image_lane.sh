# shellcheck shell=bash
# The gpu-image rehearsal of .ci/run: on the CPU, a GPU session on the machines this project borrows. Sourced by
# .ci/run after its helpers (fail, lane_done, disk_free, lane_versions); `gpu_image_rehearsal VENV` runs it in the
# oldest lane's venv, which already holds the image's Python 3.12, torch 2.11.0 and triton 3.6.0 (fastprompt's
# floors), so the 4.6 GB torch is installed once for both.
#
# The GPU machines run a fixed, offline image: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0,
# huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, accelerate 1.15.0, numpy 2.5.2 (read off one of
# them, 2026-11), some peft; at most 64 MiB of wheels travel with a run. This lane builds that stack here (the
# PyPI torch 2.11.0 is the same CUDA 13.0 build) over the oldest lane's venv, then:
#   1. runs benchmarks/gpu_session.sh with no wheels (the image's own transformers 5.17, below fastprompt's floor:
#      it must stop at once and say so, exit 2), then with the wheels that benchmarks/gpu_wheels.sh downloads: it
#      must get through its install stages and skip the GPU stages cleanly (exit 3: no CUDA device here);
#   2. runs, on the stack the session leaves (torch 2.11 / triton 3.6 / the wheels' transformers and peft), the
#      Triton kernels under triton 3.6's interpreter and patched-model smokes.

GPU_IMAGE_PINS=(torch==2.11.0 triton==3.6.0)
GPU_IMAGE_STACK=(transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0
                 accelerate==1.15.0 numpy==2.5.2 peft==0.20.0)
GPU_IMAGE_TESTS=(
  # the Triton kernels under triton 3.6's interpreter with the image's numpy 2.5 (fastprompt/kernels/
  # interpreter_compat.py), patched models on the Triton backend and a real MiniLM, the versions fastprompt reports;
  # the whole suite, the AOT compiles with triton 3.6's ptxas included, ran on this torch / triton in the oldest lane
  tests/test_interpreter_compat.py tests/test_prefix_attention_triton.py tests/test_integration_triton.py
  tests/test_patch_peft_minilm.py tests/test_versions_and_cli.py
)

gpu_image_session_check() {  # label, wheels folder, expected exit status, lines SUMMARY.txt must hold...
  local label=$1 wheels=$2 want=$3 out=.ci-cache/gpu_session_$1 rc line
  shift 3
  OUT=$out PYTHON=$GPU_IMAGE_VENV/bin/python WHEELS=$wheels bash benchmarks/gpu_session.sh > "$out.log" 2>&1
  rc=$?
  echo "gpu_session.sh ($label): exit $rc (expected $want)"
  sed 's/^/  | /' "$out/SUMMARY.txt"
  (( rc == want )) || { cat "$out.log"; return 1; }
  for line in "$@"; do
    grep -q -- "$line" "$out/SUMMARY.txt" || { echo "SUMMARY.txt lacks: $line"; cat "$out.log"; return 1; }
  done
}

gpu_image_python() {  # the image's Python 3.12 where this machine has one (a pyenv shim answers even where not)
  local candidate
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" > /dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  echo python3
}

gpu_image_rehearsal() {  # venv: the oldest lane's (Python 3.12, torch 2.11.0, triton 3.6.0, fastprompt installed)
  local venv=$1 lane_start
  lane_start=$(date +%s)
  GPU_IMAGE_VENV=$venv
  echo "=== gpu-image rehearsal in the oldest lane's venv: the GPU image's stack, then the wheels gpu_session.sh brings ($(disk_free)) ==="
  rm -rf .ci-cache/whl .ci-cache/empty
  mkdir -p .ci-cache/empty
  "$venv/bin/pip" install -q "${GPU_IMAGE_PINS[@]}" "${GPU_IMAGE_STACK[@]}" || fail gpu-image "$venv"
  echo "gpu-image rehearsal, the image's stack: $(lane_versions "$venv")"

  # 1. The session's install step, without and with wheels (the GPU stages skip: no CUDA device here).
  # Without wheels the image's transformers 5.17 is below fastprompt's floor (5.23: on 5.17 the layer-prefix
  # placement of fastprompt's own prompts gives wrong results), so the session must stop at once, saying so.
  gpu_image_session_check no_wheels .ci-cache/empty 2 "^transformers 5.17.0: older than tested" \
    "^STOPPED: installed versions are older than fastprompt's floors" || fail gpu-image "$venv"
  DEST=.ci-cache/whl PIP="$venv/bin/python -m pip" bash benchmarks/gpu_wheels.sh || fail gpu-image "$venv"
  gpu_image_session_check wheels .ci-cache/whl 3 "^install_wheels: exit 0" "^install_fastprompt: exit 0" \
    "^info: exit 0" "^SKIPPED build, gpu_tests, decode_bench, fastprompt_bench, vision_bench: no CUDA device" \
    || fail gpu-image "$venv"
  echo "gpu-image rehearsal, after the wheels: $(lane_versions "$venv")"

  # 2. The Triton kernels under triton 3.6's interpreter with the image's numpy and patched models, on what the
  # session left (the oldest lane ran the whole suite on the same torch / triton just before).
  "$venv/bin/python" -m pytest -q -n 2 --dist loadfile -p no:cacheprovider "${GPU_IMAGE_TESTS[@]}" \
    || fail gpu-image "$venv"
  echo "gpu-image rehearsal: $(( $(date +%s) - lane_start )) s"
}
