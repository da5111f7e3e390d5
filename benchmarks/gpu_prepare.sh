#!/usr/bin/env bash
# Run here, before lending a GPU machine one of the device scripts: put what that machine lacks into
# git-ignored folders of the checkout, to be carried with the call. A call carries at most 64 MiB.
#
#   bash benchmarks/gpu_prepare.sh               for benchmarks/gpu_check.sh, carry [".whl", ".gpu-data"]
#     .whl/      wheels for Python 3.12 / x86-64 of the packages its image does not hold (zarr and what it
#                needs, dask.distributed and what it needs, PyAV), at the versions this checkout's .venv has;
#                PyAV at the newest release pyproject.toml admits (pip's choice on Python 3.12)
#     .gpu-data/ the real dataset from ../shared (which does not travel)
#     together about 57 MiB
#
#   bash benchmarks/gpu_prepare.sh closed-loop   for benchmarks/gpu_closed_loop.sh, carry [".whl-sim", ".gl"]
#     .whl-sim/  zarr's wheels and PyAV as above, and the `sim` extra: MuJoCo, gym-aloha, and dm_control
#                without its locomotion models, the suite's dog meshes and its own test assets (107 of
#                its 113 MB, none of which the ALOHA scene loads), with what they need that the image
#                lacks (scipy, lxml, absl and etils are there)
#     .gl/       the EGL loader packages MuJoCo renders through on that machine (device README)
#     together about 62 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ZARR="zarr numcodecs crc32c google-crc32c msgspec donfig"

download() {  # download DEST NAME...: each at this checkout's version (PyAV: the newest pyproject.toml admits)
    local dest=$1 name version spec
    shift
    for name in "$@"; do
        version=$("$PYTHON" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
        [ -n "$version" ] || continue  # not needed by the versions this checkout runs
        spec=$name==$version
        [ "$name" = av ] && spec=$(sed -n 's/^ *"\(av[^"]*\)",$/\1/p' pyproject.toml)
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$spec" \
            || python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest" "$spec"  # pure-Python wheels
    done
}

slim_dm_control() {  # slim_dm_control DIR: rewrite DIR's dm_control wheel without what the ALOHA scene never loads
    "$PYTHON" - "$1" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("dm_control-*.whl"))
drop = ("dm_control/locomotion/", "dm_control/suite/dog_assets/", "dm_control/mujoco/testing/", "dm_control/blender/")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    kept = [i for i in src.infolist() if not (i.filename.startswith(drop) or i.filename.endswith("_test.py"))]
    names = {i.filename for i in kept}
    for item in kept:
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # list only the files the wheel still holds
            data = b"".join(line for line in data.splitlines(keepends=True) if line.split(b",")[0].decode() in names)
        dst.writestr(item, data)
slim.replace(wheel)
EOF
}

if [ "${1:-}" = closed-loop ]; then
    rm -rf .whl-sim && mkdir -p .whl-sim
    download .whl-sim $ZARR av mujoco dm-control gym-aloha dm-env dm-tree pyopengl gymnasium farama-notifications
    slim_dm_control .whl-sim
    rm -rf .gl && mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    apt-get $o update -qq >/dev/null
    (cd .gl && apt-get $o download -qq libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
    du -sh .whl-sim .gl
else
    rm -rf .whl && mkdir -p .whl
    download .whl $ZARR dask distributed partd locket tblib zict tornado av
    rm -rf .gpu-data && mkdir -p .gpu-data
    cp -r ../shared/datasets/g1_pick_bottle_3ep .gpu-data/
    du -sh .whl .gpu-data
fi
