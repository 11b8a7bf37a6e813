#!/usr/bin/env bash
# Set up kiln on a fresh machine: a virtual environment in .venv with the tested, pinned set of
# dependencies (scripts/constraints.txt) and kiln itself, editable. Safe to run again: what is
# already installed is kept.
#   PYTHON=python3.11        the interpreter for the venv
#   TORCH_INDEX_URL=...      a wheel index for torch (e.g. a CPU-only one on a machine without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }

# torch first and pinned: an open range would pull a multi-GB CUDA build onto a CPU machine.
torch_pin=$(grep -E '^torch==' scripts/constraints.txt)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_pin#torch==}')" 2>/dev/null; then
  pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_pin"
fi
pip_install -c scripts/constraints.txt -e ".[dev]"
"$VENV/bin/python" -c "import torch, lightning, kiln; print(f'kiln {kiln.__version__} ready: torch {torch.__version__}, lightning {lightning.__version__}, cuda={torch.cuda.is_available()}')"
