#!/usr/bin/env bash
# Stage, here, what benchmarks/gpu_check.sh needs on the GPU machine and cannot fetch
# there (it has no network, and ../shared does not travel with the repo): the gguf
# wheel and the Llama-2 vocabulary / TinyLlama tokenizer files the synthetic models
# use. Writes .gpu/ (ignored by git, about 3 MB); the device run names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${PYFORGE_SHARED_DIR:-../shared}
tok=models/TinyLlama-1.1B-Chat-v1.0
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/shared/vocab ".gpu/shared/$tok"
cp "$shared/vocab/ggml-vocab-llama-spm.gguf" .gpu/shared/vocab/
for f in tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json; do
  cp "$shared/$tok/$f" ".gpu/shared/$tok/"
done
# gguf is pure Python; its needs (numpy, pyyaml, requests, tqdm) are in the GPU image.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu/wheels "gguf==0.19.0"
du -sh .gpu
