#!/usr/bin/env bash
# The GPU check, on the GPU machine: install the carried wheels (.whl/, fetched here by fetch_wheels.sh) into
# /tmp/site, put them and this checkout on PYTHONPATH (the project itself needs no install), then run
# check.py within its 8-minute budget. Everything it measures lands in $OUT.
#
#     bash benchmarks/gpu/run_check.sh [check.py options]     # e.g. --compile, --only env,encoders
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: the carried wheels did not install" | tee -a "$out/check.log"; exit 2; }
    export PYTHONPATH="$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ here: using the installed packages (run benchmarks/gpu/fetch_wheels.sh first)" | tee -a "$out/check.log"
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
# the project without its dependencies: importable from the checkout; the edgedistill command is python -m edgedistill
python3 -c "import edgedistill, sys; print('edgedistill from', edgedistill.__file__)" | tee -a "$out/check.log"
exec python3 benchmarks/gpu/check.py --out "$out" "$@"
