#!/usr/bin/env bash
# The GPU checks, on a machine with CUDA: the `gpu`-marked tests, then the serving benchmark on
# CUDA, which prints its table, then both engines side by side when a vLLM (CUDA) environment is
# given. Extra arguments go to the serving benchmark.
#
#   bash scripts/gpu_check.sh
#   PYTHON=/path/to/venv/bin/python bash scripts/gpu_check.sh   # another environment with the dev extra
#   VLLM_VENV=.venv-vllm-cuda bash scripts/gpu_check.sh          # plus --engine vllm beside the built-in one
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# Name the GPU first, so that every figure below can be quoted with the card it came from.
"$PY" - <<'PYEOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; nothing to check here")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

echo "== gpu tests"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests

bench=benchmarks/serve_bench.py
echo "== serving benchmark"
if [ ! -f "$bench" ]; then
    echo "gpu_check: $bench is missing" >&2
    exit 1
fi
# Ask for CUDA explicitly where the benchmark has the flag; otherwise it picks CUDA itself (device auto).
if "$PY" "$bench" --help 2>/dev/null | grep -q -- '--device'; then
    "$PY" "$bench" --device cuda "$@"
else
    "$PY" "$bench" "$@"
fi

if [ -n "${VLLM_VENV:-}" ]; then
    echo "== engines side by side (built-in and --engine vllm, both on CUDA)"
    "$PY" benchmarks/engines_side_by_side.py --device cuda --vllm-venv "$VLLM_VENV"
fi
