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

# torch and torchvision first, pinned, from TORCH_INDEX_URL when given: by default the build
# `pip install torch` gives on Linux (CUDA 13; it runs on the CPU too; about 5 GB with its nvidia-*
# wheels); a CPU-only index gives a much smaller one for machines without a GPU.
torch_pin=$(grep -E '^torch==' scripts/constraints.txt)
vision_pin=$(grep -E '^torchvision==' scripts/constraints.txt)
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_pin#torch==}')" 2>/dev/null; then
  pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -c scripts/constraints.txt "$torch_pin" "$vision_pin"
fi
pip_install -c scripts/constraints.txt -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchvision, timm, lightning, kiln; print(f'kiln {kiln.__version__} ready: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, lightning {lightning.__version__}, cuda={torch.cuda.is_available()}')"
