#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_session.sh installs on the GPU image, into .whl/ (git-ignored; the
# device tool carries it: `carry: [".whl"]`). The image is fixed and offline: Python 3.12, torch 2.11.0+cu130,
# triton 3.6.0, transformers 5.17.0, huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, numpy 2.5.2,
# accelerate 1.15.0, some peft. At most 64 MiB of wheels can travel per run: torch and triton cannot, the
# pure-Python Hugging Face stack can.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/*.whl, then checks the total against WHEELS_MAX_MIB (64)
#
# The set is the newest stack fastprompt is tested on (the newest CI lane): transformers and peft, which
# gpu_session.sh installs by name, and every dependency of theirs that the image lacks (HF `kernels`, httpx2,
# httpcore2, truststore, tomlkit) or may hold too old for them (huggingface_hub >= 2.4 for transformers 5.25, and
# the small ones whose image versions are not known: click, hf-xet, regex, idna, anyio, typing_extensions, h11).
# pip takes a brought wheel only where the installed version does not satisfy the requirement, so the extra
# ones cost bytes, not changes. .ci/gpu_image_lane.sh rehearses the install on the image's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
WHEELS_MAX_MIB=${WHEELS_MAX_MIB:-64}
PIP=${PIP:-python3 -m pip}

# Keep in step with the newest lane's versions (.ci/run) and fastprompt/_versions.py's tested ranges.
WHEELS=(
  transformers==5.25.0 peft==0.21.2
  kernels==0.19.1 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 tomlkit==0.15.3
  click==8.5.1 hf-xet==1.8.0 regex==2026.12.2 idna==3.21 anyio==4.16.0 typing_extensions==4.16.0 h11==0.16.0
  tokenizers==0.23.3 safetensors==0.8.0
)

rm -rf "$DEST"
mkdir -p "$DEST"
# The image's interpreter and platform, not this machine's: binary wheels (regex, hf-xet, kernels, tokenizers)
# must be cp312 / abi3 builds for manylinux x86_64.
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"

count=$(find "$DEST" -type f -name '*.whl' | wc -l)
if (( count != ${#WHEELS[@]} )); then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  exit 1
fi
total=$(find "$DEST" -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
limit=$(( WHEELS_MAX_MIB * 1024 * 1024 ))
printf 'gpu_wheels: %d wheels, %.1f MiB in %s (limit %d MiB)\n' "$count" "$(awk -v b="$total" 'BEGIN {print b / 1048576}')" \
  "$DEST" "$WHEELS_MAX_MIB"
if (( total > limit )); then
  echo "gpu_wheels: over the ${WHEELS_MAX_MIB} MiB that can travel to the GPU machine" >&2
  exit 1
fi
