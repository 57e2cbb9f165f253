#!/usr/bin/env bash
# Debian's headless Chromium for the browser check of the Prefect UI (tests/support/browser.py).
# Installed once by `make test`; needs root or passwordless sudo. Without either it says so and
# the browser test fails with the same message (it never skips silently).
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else
  echo "install_chromium: chromium is missing and apt-get needs root: sudo apt-get install chromium" >&2
  exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
echo "install_chromium: $(chromium --version)"
