#!/usr/bin/env bash
# Install promptkd into the active Python environment, with the extras that the README's two commands
# need: `promptkd demo` (gguf: the demo's SmolLM2 GGUF file) and `python -m pytest` (test, which
# includes plot: matplotlib).
#   bash scripts/install.sh            # library + demo + tests
#   EXTRAS=dev,gguf bash scripts/install.sh
# If a CPU build of torch 2.13.0 is available on this machine's local wheel store, it is used
# (no multi-GB CUDA download); elsewhere pip picks torch as usual from the `torch>=2.2` bound.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,gguf}"
PIP="python -m pip"
if ! python -c "import torch" 2>/dev/null; then
  if $PIP install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    echo "install: using the local torch 2.13.0 wheel"
  fi
fi
# (the grep only hides this machine's harmless local-index warnings; pip's status is kept)
$PIP install -q -e ".[${EXTRAS}]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
python -c "import promptkd, torch; print(f'install: promptkd {promptkd.__version__}, torch {torch.__version__}')"
