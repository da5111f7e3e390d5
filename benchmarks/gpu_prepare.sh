#!/usr/bin/env bash
# Run here, before lending benchmarks/gpu_check.sh a GPU machine: put what that machine lacks into two
# git-ignored folders of the checkout, to be carried with the call (`carry: [".whl", ".gpu-data"]`).
#   .whl/      wheels for Python 3.12 / x86-64 of the packages its image does not hold (zarr and what it
#              needs, dask.distributed and what it needs, PyAV), at the versions this checkout's .venv has;
#              PyAV at the newest release pyproject.toml admits (pip's choice on Python 3.12)
#   .gpu-data/ the real dataset from ../shared (which does not travel)
# Together about 45 MiB, under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES="zarr numcodecs crc32c google-crc32c msgspec donfig dask distributed partd locket tblib zict tornado av"
rm -rf .whl && mkdir -p .whl
for name in $PACKAGES; do
    version=$("$PYTHON" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
    [ -n "$version" ] || continue  # not needed by the versions this checkout runs
    spec=$name==$version
    # PyAV: the newest release pyproject.toml admits, which is what pip gives users on Python 3.12
    [ "$name" = av ] && spec=$(sed -n 's/^ *"\(av[^"]*\)",$/\1/p' pyproject.toml)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" \
        || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec"  # pure-Python wheels
done
rm -rf .gpu-data && mkdir -p .gpu-data
cp -r ../shared/datasets/g1_pick_bottle_3ep .gpu-data/
du -sh .whl .gpu-data
