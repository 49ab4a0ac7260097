#!/usr/bin/env bash
# The test suite: lint, then pytest (CUDA-only tests skip cleanly without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m ruff check simple_generation tests benchmarks examples scripts
python3 -m pytest -q -p no:cacheprovider "$@"
