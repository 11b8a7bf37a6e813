#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff (lint + format), mypy, and the whole test suite.
# Extra arguments go to pytest: bash scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check src tests scripts && .venv/bin/ruff format --check src tests scripts
echo "== mypy"; .venv/bin/mypy src
echo "== browser"; bash scripts/install_browser.sh  # headless Chromium for tests/test_tensorboard_server.py
echo "== pytest"; .venv/bin/python -m pytest "$@"
