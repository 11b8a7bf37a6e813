#!/usr/bin/env bash
# Fault cases in a loop: bash scripts/stress.sh [N]   (N iterations, default 2)
# Signals (SIGINT, SIGTERM, SIGKILL) at random points of kiln train, compress, export and predict
# on tiny configs, and two kiln train on one run_dir; after each iteration every run directory must
# be completed and consistent or resumable, with no temp file left (scripts/stress.py says how).
# Last line: iterations=N consistent=N lost=0; exit code 1 if any iteration was not consistent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python="python"
exec "$python" scripts/stress.py --iterations "${1:-2}" "${@:2}"
