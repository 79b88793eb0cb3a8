#!/usr/bin/env bash
# GPU benchmark for a lent H100/H200 (at most 8 minutes): installs the project if needed, then
# times sharelora against PEFT LoRA on a 1.2B Llama and writes $OUT/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:=out}"
mkdir -p "$OUT"
python -c "import sharelora" 2>/dev/null || python -m pip install --quiet -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 450 python benchmarks/gpu.py --json "$OUT/gpu.json" "$@" | tee "$OUT/gpu.md"
