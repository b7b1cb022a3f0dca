#!/usr/bin/env bash
# The whole GPU path in one go (about 5 minutes on one GPU): embedded data at 224 px, 40 iterations
# of har-vits8 with FlashAttention on (sdpa) and off (naive), eval and attention maps on the GPU, a
# short speed sweep, the report. One line per step; exits non-zero on any failure.
#   bash benchmarks/gpu_smoke.sh                       # on the GPU
#   bash benchmarks/gpu_smoke.sh --tiny --device cpu   # the same steps at toy sizes (runs in make test)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" benchmarks/gpu_smoke.py "$@"
