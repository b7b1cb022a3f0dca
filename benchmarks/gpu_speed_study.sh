#!/usr/bin/env bash
# The FlashAttention speed study on one GPU, in one go (about 5 minutes on an H100).
# Writes report/bench/gpu-<device>.json, which notebook 05 and the report pick up: commit it.
# Usage: bash benchmarks/gpu_speed_study.sh   (needs torch, torchvision, timm; flash-attn optional)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
mkdir -p report/bench
"$PY" -m dinokit bench --preset gpu --device cuda --warmup 3 --repeats 10 --out "report/bench/gpu-${name}.json" 2>&1 \
  | tee "report/bench/gpu-${name}.log"
