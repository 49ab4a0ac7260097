#!/usr/bin/env bash
# Set-up on a fresh machine: a CPU build of torch first (a plain `torch` requirement would pull
# several GB of CUDA packages), then the package with its test and optional CPU extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test,lora,emissions,gguf]"
