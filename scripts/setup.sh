#!/usr/bin/env bash
# Set-up on a fresh machine: PyTorch first, then this package with its test and optional CPU extras.
#
# `pip install torch==2.13.0` takes whatever build pip finds for that version: on a machine whose pip has a
# local CPU wheel of it (this project's build machines) that is the CPU build; on an ordinary Linux machine
# it is the CUDA build from PyPI (several GB of nvidia packages). For the CPU-only build anywhere, set
# TORCH_INDEX to PyTorch's CPU wheel index (the address PyTorch's install selector gives for "CPU").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${TORCH_INDEX:-}" ]; then
    python3 -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
else
    python3 -m pip install -q "torch==2.13.0"
fi
python3 -m pip install -q -e ".[test,lora,emissions,gguf,dedup,parquet,datasets,app,ray,structured,translation,vision]"
