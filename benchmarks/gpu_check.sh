#!/usr/bin/env bash
# The GPU check on the GPU machine, from the repository root, in under eight minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]     (OUT_DIR defaults to $OUT)
#
# Installs the wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh) into a private folder, then
# runs benchmarks/gpu_check.py, which prints the table and writes OUT_DIR/gpu_check.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
shift || true
SITE=${MAJORTOM_GPU_SITE:-/tmp/majortom-gpu-site}
PY=${PYTHON:-python3}
WHEELS=${MAJORTOM_GPU_WHEEL_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import pydantic, pyproj, shapely" 2>/dev/null; then
    echo "gpu_check: pydantic, pyproj or shapely missing: run scripts/fetch_gpu_wheels.sh and carry .whl" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/nvidia-smi.csv" 2>/dev/null || true
# the check's own budget is 440 s and its watchdog fires at 460 s; this is the last resort
PYTHONUNBUFFERED=1 timeout 475 "$PY" benchmarks/gpu_check.py --out-dir "$OUT_DIR" "$@"
