#!/usr/bin/env bash
# On a GPU machine: install the carried wheels beside the machine's torch/transformers, then run
# benchmarks/gpu.py (writes $OUT/gpu-bench.json). Keeps the machine's transformers and hub.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=/tmp/stepsal-deps
rm -rf "$DEPS"
pip install -q --no-index --no-deps --target "$DEPS" wheels/*.whl
export PYTHONPATH="$DEPS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python -c "import stepsal, transformer_lens, transformers, torch; print('ok', torch.__version__, transformers.__version__)"
python benchmarks/gpu.py --out "${OUT:-.}/gpu-bench.json" "$@"
