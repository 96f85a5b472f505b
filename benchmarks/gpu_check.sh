#!/usr/bin/env bash
# One command for an offline CUDA machine, under 8 minutes: gpu/tensorrt-marked tests, Upscaler requests
# (uint8 in/out, device noise, end-to-end vs GPU-only at batch 1 and 8), the eager-fp16 probe, then
# esrdf-bench's latency suite (eager, torch fp32, torch fp16, torch fp16 + CUDA graph, TensorRT static b1/b8
# + graph when present) and the consistency checks: python -m esrdf.bench.gpu_check. Writes JSON and
# tables under $OUT (or out/gpu_check/). Without CUDA it reports "no CUDA", writes the JSON, exits 0, and saves the held-out
# test photos to out/gpu_check/photos.npz for a GPU machine without scikit-image.
#   bash benchmarks/gpu_check.sh [--budget-s 450] [--repeats 20] [--skip-tests] ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The project maps runtime/ engines/ export/ benchmarks/ onto esrdf.*; that needs the (offline, no-deps)
# install, redone where an older install predates a mapping.
if ! "$PY" -c "import esrdf.runtime, esrdf.engines, esrdf.bench.gpu_check" >/dev/null 2>&1; then
    echo "installing the project: $PY -m pip install --no-deps --no-build-isolation -e ."
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
exec "$PY" -m esrdf.bench.gpu_check "$@"
