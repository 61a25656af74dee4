#!/usr/bin/env bash
# Download the Python 3.12 manylinux wheels the GPU check needs and the GPU machine lacks, into
# .whl/ (git-ignored) for the device tool to carry (`carry: [".whl"]`, 64 MiB for everything).
#
#   bash scripts/fetch_gpu_wheels.sh               # pydantic + pyproj + shapely + imagecodecs
#   bash scripts/fetch_gpu_wheels.sh --minimal     # without imagecodecs (DEFLATE falls back to zlib)
#
# Versions are the ones installed in this checkout's .venv, so the GPU run uses what the tests
# ran against. Which wheels and why: docs/benchmarks.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
MINIMAL=0
[[ "${1:-}" == "--minimal" ]] && MINIMAL=1

# pydantic (EngineConfig, ModelSpec, MetadataFilter) and its pure-Python needs; pyproj + shapely
# (output footprints in geoparquet, cell placement in synthetic); imagecodecs (libdeflate).
NAMES=(pydantic pydantic_core annotated_types typing_inspection typing_extensions pyproj shapely)
[[ $MINIMAL == 1 ]] || NAMES+=(imagecodecs)

SPECS=$("$PY" - "${NAMES[@]}" <<'PYEOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
PYEOF
)
rm -rf "$DEST" && mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" $SPECS
ls -l "$DEST"
TOTAL=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $TOTAL bytes ($((TOTAL / 1048576)) MiB) in $(ls "$DEST"/*.whl | wc -l) wheels"
if (( TOTAL > 60 * 1048576 )); then
    echo "error: the wheels exceed 60 MiB; the working tree and the wheels must stay under 64 MiB" >&2
    exit 1
fi
