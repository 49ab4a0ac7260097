#!/usr/bin/env bash
# The test suite: lint, then pytest (CUDA-only tests skip cleanly without a GPU), then each fast engine's
# tests in its own environment when scripts/engine-env.sh made it (they pin their own transformers).
# With arguments, only lint and `pytest ARGS` run: `bash scripts/test.sh -m "not slow"` is the quick tier (README).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m ruff check simple_generation tests benchmarks examples scripts
python3 -m pytest -q -p no:cacheprovider "$@"
if [ "$#" -eq 0 ]; then
    for engine in openvino vllm; do
        if [ -x ".venv-$engine/bin/python" ]; then
            echo "== tests of the $engine engine, in .venv-$engine"
            ".venv-$engine/bin/python" -m pytest -q -p no:cacheprovider "tests/test_engine_$engine.py"
        else
            echo "== .venv-$engine missing (bash scripts/engine-env.sh $engine): its tests were skipped above"
        fi
    done
fi
