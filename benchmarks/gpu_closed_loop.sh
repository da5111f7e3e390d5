#!/usr/bin/env bash
# The closed-loop benchmark (benchmarks/closed_loop.py) on a lent GPU machine, in one call.
#
# Scripted demonstrations in 16 worker processes rendering through the NVIDIA driver's EGL, extract,
# train, export (AOTInductor) and `sim eval` of 50 held-out episodes, for the rows in CONFIGS, within
# the 10 minutes a call may run. Training that outruns its budget (BUDGET) is cut at its last
# checkpoint (one every tenth of the schedule), which is exported and evaluated; the table says so. Prepare here with `bash benchmarks/gpu_prepare.sh closed-loop`, then
# run it with carry [".whl-sim", ".gl"]:
#
#   bash benchmarks/gpu_closed_loop.sh
#
# Settings (environment): CONFIGS (dino-cached), BATCH (64: LeRobot's 800k samples are 12,500 steps),
# STEPS (given: instead of the samples), EPISODES (50 demonstrations and 50 evaluation episodes),
# WEIGHTS (random), BUDGET (closed_loop.py --budget, minutes per phase), LIMIT_S (540: the whole run),
# DEVICE (cuda), EXTRA (more closed_loop.py options). A dry run on a CPU-only machine:
#   DEVICE=cpu EXTRA=--smoke bash benchmarks/gpu_closed_loop.sh
# Results go to $OUT (default /tmp/dinocache-closed-loop): closed_loop.log (everything),
# closed_loop.json, closed_loop.md (the table) and the first rollout video of each row.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dinocache-closed-loop}
mkdir -p "$OUT"
LOG=$OUT/closed_loop.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl

. benchmarks/_device_env.sh
carried_wheels .whl-sim "$LOG" || { echo "installing the carried wheels failed (see $LOG)"; exit 1; }
if compgen -G ".gl/*.deb" >/dev/null; then  # the EGL loaders (device README): unpacked over /, as it says
    for deb in .gl/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    [ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ] && \
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

DEVICE=${DEVICE:-cuda}
EPISODES=${EPISODES:-50}
WORK=$(mktemp -d /tmp/dinocache-closed-loop.XXXXXX)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    python3 -c "import torch, mujoco, dm_control, av, zarr; print('torch', torch.__version__, 'mujoco', mujoco.__version__,
        'av', av.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1
# shellcheck disable=SC2086  # EXTRA and the step options are word lists
timeout --kill-after=10 "${LIMIT_S:-540}" python3 benchmarks/closed_loop.py --work "$WORK" --device "$DEVICE" \
    --configs "${CONFIGS:-dino-cached}" --weights "${WEIGHTS:-random}" --batch-size "${BATCH:-64}" \
    ${STEPS:+--steps $STEPS} --demo-episodes "$EPISODES" --eval-episodes "$EPISODES" --videos 1 \
    --budget "${BUDGET:-demos=1.5,extract=1.5,train=4,export=2.5,eval=2}" \
    --record "$OUT/closed_loop.md" --json "$OUT/closed_loop.json" ${EXTRA:-} >>"$LOG" 2>&1
rc=$?
for video in "$WORK"/*/eval/videos/*.mp4; do [ -f "$video" ] && cp "$video" "$OUT/$(basename "$(dirname "$(dirname "$(dirname "$video")")")")_$(basename "$video")"; done
echo "closed_loop.py exit status $rc ($( [ $rc -eq 124 ] && echo "ran past ${LIMIT_S:-540} s" || echo done)); log: $LOG" | tee -a "$LOG"
tail -n 30 "$LOG"
rm -rf "$WORK"
exit $rc
