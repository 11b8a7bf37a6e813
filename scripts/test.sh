#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff (lint + format), mypy, and the whole test suite.
# Extra arguments go to pytest: bash scripts/test.sh -m "not slow" -x
# The tests run in two worker processes (pytest-xdist), a test file per worker at a time, so that a
# file's module and session fixtures (a trained run, the SLURM cluster, the MLflow server) are made
# once; most of a test's time is a child process importing torch, which the other worker overlaps.
# KILN_TEST_WORKERS=0 runs them in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check src tests scripts && .venv/bin/ruff format --check src tests scripts
echo "== mypy"; .venv/bin/mypy src
echo "== browser"; bash scripts/install_browser.sh  # headless Chromium for tests/test_tensorboard_server.py
workers=${KILN_TEST_WORKERS:-2}
parallel=()
[[ $workers != 0 ]] && parallel=(-n "$workers" --dist loadfile)
echo "== pytest"; .venv/bin/python -m pytest "${parallel[@]}" "$@"
