#!/usr/bin/env bash
# The demo: set up, then train the digits CNN on CPU (a minute or two on 2 cores).
# Extra arguments are passed on as overrides: bash scripts/demo.sh trainer.max_epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kiln train experiment=digits_cnn "$@"
