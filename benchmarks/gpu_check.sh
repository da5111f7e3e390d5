#!/usr/bin/env bash
# The whole CUDA path in one go, on a machine with a CUDA GPU and the package's dependencies installed.
#
# A GPU is rare for this project's sessions: this script is how every device path gets checked at once
# when one is lent. On the real LeRobot dataset it runs extract (bf16 autocast), inspect, train (400 steps
# at batch 8 and at 64), finetune (40 steps end to end from the batch-8 run, then its export), ACT's
# online ResNet18 (40 steps), export (.pt2 in float32 and bfloat16, AOTInductor-compiled; ONNX in
# float16), bench-policy (CUDA graph) and `load_policy(...,
# device="cuda").select_action` on numpy frames, a 4-worker dask extraction compared array by array with
# the single-process store, the test suite's CUDA cases, then the GPU rows of the benchmarks. Each step
# has its own time limit, so one hang does not take the rest; every step's output (tracebacks included)
# goes to one log, a failing step's tail is also printed, and a summary table ends the run. Exit status
# 1 when any step failed. About 8 minutes on one H200 (the training-step benchmark adds at most 2).
#
#   bash benchmarks/gpu_check.sh [DATASET]
#
# DATASET defaults to .gpu-data/g1_pick_bottle_3ep (what benchmarks/gpu_prepare.sh copies into the
# checkout, since ../shared does not travel to a lent machine), else ../shared/datasets/g1_pick_bottle_3ep.
# BENCHMARKS=1 (default) runs the five GPU benchmarks, 0 none, or a comma list of policy, extract,
# train_step, compare, compare_compiled picks some (run in the order extract, compare_compiled, policy,
# train_step, compare). The next run after 2026-11-30: BUDGET=540 BENCHMARKS_FIRST=1
# BENCHMARKS=extract,compare_compiled,policy, the three that the changes since the first H200 run are about.
# BUDGET=N (seconds) cuts each step's limit to what is left of N and skips the steps that no longer fit,
# so that a machine lent for a fixed time still returns the summary (e.g. BUDGET=540 under a 600 s call).
# A dry run of the script itself on a CPU-only machine (small settings, no benchmarks):
#   DEVICE=cpu BACKBONE=dinov2_vits14 IMAGE_SIZE=56 EPISODES=0:1 STEPS=5 BENCHMARKS=0 bash benchmarks/gpu_check.sh
# Wheels in .whl/ (gpu_prepare.sh downloads them) are installed first when present. Results go to $OUT
# (default /tmp/dinocache-gpu-check): gpu_check.log (the summary at its end), and the benchmarks' JSON.
set -uo pipefail
BEGAN=$(date +%s)  # BUDGET counts from here, the carried wheels' install included
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dinocache-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
WORK=$(mktemp -d /tmp/dinocache-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: >"$LOG"

. benchmarks/_device_env.sh
carried_wheels .whl "$LOG" || { echo "installing the carried wheels failed (see $LOG)"; exit 1; }

DATASET=${1:-}
for candidate in "$DATASET" .gpu-data/g1_pick_bottle_3ep ../shared/datasets/g1_pick_bottle_3ep; do
    if [ -n "$candidate" ] && [ -f "$candidate/meta/info.json" ]; then DATASET=$(cd "$candidate" && pwd); break; fi
done
[ -f "$DATASET/meta/info.json" ] || { echo "no dataset found (give its path as the first argument)"; exit 1; }

DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-dinov2_vitb14_reg}
STEPS=${STEPS:-400}
SHORT=$(( STEPS < 40 ? STEPS : 40 ))  # the end-to-end runs (backbone in the step): 40 steps, fewer in a dry run
BENCHMARKS=${BENCHMARKS:-1}
SIZE_ARG=${IMAGE_SIZE:+--image-size $IMAGE_SIZE}
EPISODE_ARG=${EPISODES:+--episodes $EPISODES}
DC="python3 -m dinocache.cli"
BUDGET=${BUDGET:-0}  # seconds for the whole script (0: none); later steps get what is left, so the summary is written
declare -a NAMES STATUS TOOK
step() {  # step NAME TIMEOUT_S COMMAND...: run it, log everything, remember how it went
    local name=$1 limit=$2 rc start
    shift 2
    if [ "$BUDGET" -gt 0 ]; then
        local left=$(( BUDGET - ($(date +%s) - BEGAN) ))
        if [ "$left" -lt 30 ]; then
            NAMES+=("$name"); TOOK+=("0"); STATUS+=("SKIPPED")
            printf '%-34s SKIPPED (%ss of BUDGET=%s left)\n' "$name" "$left" "$BUDGET" | tee -a "$LOG"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    printf '\n===== %s (limit %ss) =====\n$ %s\n' "$name" "$limit" "$*" >>"$LOG"
    printf '%-34s ' "$name"
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" bash -c "$*" >>"$LOG" 2>&1
    rc=$?
    local took
    took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
    NAMES+=("$name"); TOOK+=("$took")
    if [ $rc -eq 0 ]; then
        STATUS+=("ok"); echo "ok      ${took} s"
    else
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && STATUS+=("TIMEOUT") || STATUS+=("FAILED ($rc)")
        echo "${STATUS[-1]} ${took} s; its last lines:"
        tail -n 25 "$LOG" | sed 's/^/    | /'
    fi
}

# The GPU rows of the benchmarks: last by default, so a slow one may only cost its own row; right after the
# extraction with BENCHMARKS_FIRST=1, when the machine's time may run out before the end (they need the store).
wanted() {  # wanted NAME: whether BENCHMARKS (1 = all, 0 = none, or a comma list of names) asks for it
    [ "$BENCHMARKS" = 1 ] || [[ ",$BENCHMARKS," == *",$1,"* ]]
}
benchmarks() {
    wanted extract && step "bench_extract.py --device cuda" 150 \
        "python3 benchmarks/bench_extract.py --device cuda --dataset '$DATASET' --backbone dinov2_vitb14_reg --batch-size 64 --forward-variants --json '$OUT/bench_extract_cuda.json'"
    wanted compare_compiled && step "compare_backbones.py --device cuda --compile" 300 \
        "python3 benchmarks/compare_backbones.py --device cuda --compile --backbones dinov2_vitb14_reg --steps 40 --warmup 5 --json '$OUT/compare_backbones_compiled_cuda.json' --markdown '$OUT/compare_backbones_compiled_cuda.md'"
    wanted policy && step "bench_policy.py --device cuda" 360 \
        "python3 benchmarks/bench_policy.py --device cuda --steps 100 --json '$OUT/bench_policy_cuda.json'"
    wanted train_step && step "bench_train_step.py --device cuda" 180 \
        "python3 benchmarks/bench_train_step.py --device cuda --store '$STORE' --steps 40 --warmup 5 --json '$OUT/bench_train_step_cuda.json' --markdown '$OUT/bench_train_step_cuda.md'"
    wanted compare && step "compare_backbones.py --device cuda" 300 \
        "python3 benchmarks/compare_backbones.py --device cuda --backbones resnet18,dinov2_vits14_reg,dinov2_vitb14_reg --resnet-sizes native --steps 40 --warmup 5 --json '$OUT/compare_backbones_cuda.json' --markdown '$OUT/compare_backbones_cuda.md'"
    return 0
}
step "environment" 60 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; python3 -c '
import torch, timm, zarr, av, numpy, sys
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"timm\", timm.__version__, \"zarr\", zarr.__version__,
      \"av\", av.__version__, \"numpy\", numpy.__version__)
if \"$DEVICE\".startswith(\"cuda\"):
    assert torch.cuda.is_available(), \"CUDA is not available\"
    print(torch.cuda.get_device_name(0))'"

STORE=$WORK/features.zarr
step "extract --device $DEVICE" 120 \
    "$DC extract '$DATASET' --backbone $BACKBONE $SIZE_ARG $EPISODE_ARG --weights random --out '$STORE' --device $DEVICE --batch-size 64 --no-progress"
[ "${BENCHMARKS_FIRST:-0}" = 1 ] && benchmarks
step "inspect" 60 "$DC inspect '$STORE' --pca '$OUT/pca.png'"
step "train $STEPS steps, batch 8" 150 \
    "$DC train '$STORE' --out '$WORK/run8' --steps $STEPS --batch-size 8 --device $DEVICE --no-progress && tail -n 2 '$WORK/run8/metrics.jsonl'"
step "train $STEPS steps, batch 64" 150 \
    "$DC train '$STORE' --out '$WORK/run64' --steps $STEPS --batch-size 64 --device $DEVICE --no-progress && tail -n 2 '$WORK/run64/metrics.jsonl'"
step "finetune $SHORT steps from run8 ($DEVICE)" 200 \
    "$DC finetune '$WORK/run8' --out '$WORK/tuned' --steps $SHORT --gradient-checkpointing --device $DEVICE --no-progress && tail -n 2 '$WORK/tuned/metrics.jsonl'"
step "export the fine-tuned run ($DEVICE)" 240 \
    "$DC export '$WORK/tuned' --out '$WORK/tuned.pt2' --device $DEVICE --dtype bfloat16 --no-progress"
step "train --online resnet18, $SHORT steps" 200 \
    "$DC train --online --backbone resnet18 '$DATASET' --out '$WORK/resnet' --steps $SHORT --weights random --device $DEVICE --no-progress && tail -n 2 '$WORK/resnet/metrics.jsonl'"
step "export pt2 float32 --device $DEVICE" 240 \
    "$DC export '$WORK/run8' --out '$WORK/policy32.pt2' --device $DEVICE --no-progress"
step "export pt2 bfloat16 --device $DEVICE" 240 \
    "$DC export '$WORK/run8' --out '$WORK/policy16.pt2' --device $DEVICE --dtype bfloat16 --no-progress"
step "export onnx float16 --device $DEVICE (checked in onnxruntime)" 240 \
    "$DC export '$WORK/run8' --out '$WORK/policy16.onnx' --device $DEVICE --dtype float16 --no-progress"
step "bench-policy float32 ($DEVICE)" 90 "$DC bench-policy '$WORK/policy32.pt2' --device $DEVICE --steps 100"
step "bench-policy bfloat16 ($DEVICE)" 90 "$DC bench-policy '$WORK/policy16.pt2' --device $DEVICE --steps 100"
step "select_action, numpy frames ($DEVICE)" 90 "python3 -c '
import numpy as np, dinocache
from dinocache.policy.deployment.bench import random_observation
policy = dinocache.load_policy(\"$WORK/policy16.pt2\", device=\"$DEVICE\", temporal_ensemble_coeff=0.01)
observation = random_observation(policy.metadata)
actions = np.stack([policy.select_action(observation) for _ in range(20)])
assert actions.dtype == np.float32 and np.isfinite(actions).all(), actions
print(\"20 ensembled steps ok, queries:\", policy.queries, \"first action:\", actions[0][:4])'"
step "extract --dask-workers 4 ($DEVICE)" 180 \
    "$DC extract '$DATASET' --backbone $BACKBONE $SIZE_ARG $EPISODE_ARG --weights random --out '$WORK/dask.zarr' --device $DEVICE --batch-size 64 --dask-workers 4 --no-progress && python3 -c '
import numpy as np, zarr, sys
def arrays(group, prefix=\"\"):
    for name, array in group.arrays():
        yield prefix + name, array
    for name, sub in group.groups():
        yield from arrays(sub, prefix + name + \"/\")
one = dict(arrays(zarr.open_group(\"$STORE\", mode=\"r\")))
four = dict(arrays(zarr.open_group(\"$WORK/dask.zarr\", mode=\"r\")))
assert sorted(one) == sorted(four), (sorted(one), sorted(four))
different = [name for name in one if not np.array_equal(one[name][...], four[name][...], equal_nan=True)]
print(len(one), \"arrays compared;\", \"different:\", different or \"none\")
sys.exit(1 if different else 0)'"
step "pytest: the CUDA cases" 300 "python3 -m pytest -q -x -ra -p no:cacheprovider -k cuda tests/"

[ "${BENCHMARKS_FIRST:-0}" = 1 ] || benchmarks

failed=0
for status in "${STATUS[@]}"; do [ "$status" = ok ] || failed=$((failed + 1)); done
{
    echo
    echo "===== summary ($(date -u +%Y-%m-%dT%H:%MZ), device $DEVICE, dataset $DATASET) ====="
    for i in "${!NAMES[@]}"; do
        printf '%-36s %-12s %8s s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${TOOK[$i]}"
    done
    echo "$failed step(s) did not pass; full log: $LOG"
} | tee -a "$LOG"
rm -rf "$WORK"
[ "$failed" -eq 0 ]
