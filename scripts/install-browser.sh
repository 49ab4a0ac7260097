#!/usr/bin/env bash
# What the web app's browser tests (tests/test_app.py) need: gradio, Playwright for Python and Debian's
# Chromium (Playwright's own browser download is not used: the tests launch /usr/bin/chromium).
# Idempotent: does nothing that is already done. Needs root (or sudo) for apt-get on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q "gradio>=6,<7" "playwright>=1.40"

if ! command -v chromium >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-browser: no apt-get here; install Chromium yourself (or set SIMPLE_GENERATION_CHROMIUM)" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q chromium
fi
chromium --version 2>/dev/null | head -n 1
