#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for the TensorBoard browser test.
# Idempotent: when `chromium` is already on PATH it only prints its version and exits.
#   usage: bash scripts/install_browser.sh
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "install_browser: $(chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
# apt-get needs root; use sudo where there is one (CI images), run directly when already root.
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_browser: need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install_browser: installing chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when the first attempt cannot find the package (a fresh image).
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null \
  || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
echo "install_browser: $(chromium --version)"
