#!/usr/bin/env bash
# Fetch the wheels of benchmarks/gpu/wheels.txt for the GPU machine (Python 3.12, manylinux x86_64) into .whl/
# at the repository root (ignored by git; it travels with `run`'s carry [".whl"]). Run here, where pip reaches
# PyPI; the GPU machine has no network.
#
#     bash benchmarks/gpu/fetch_wheels.sh        # then check the total it prints (the carry limit is 64 MiB)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/.whl"
python="${PYTHON:-python3}"
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
grep -v '^\s*#' "$root/benchmarks/gpu/wheels.txt" | grep -v '^\s*$' | while read -r spec; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dest" "$spec"
done
count=$(ls "$dest"/*.whl | wc -l)
size=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((size / 1024)) KiB in $dest"
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: the wheels exceed 60 MiB; the working tree that travels is limited to 64 MiB" >&2
    exit 2
fi
