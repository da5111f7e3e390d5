#!/usr/bin/env bash
# Train an ACT head with DDP on every GPU of one machine, or of several SLURM nodes, via torchrun.
#
#   One machine:   workflows/train_torchrun.sh features.zarr runs/act1 --preset dinov2-reg --steps 100000
#   SLURM nodes:   sbatch --nodes 4 --gpus-per-node 8 workflows/train_torchrun.sh features.zarr runs/act1 --preset dinov2-reg
#   Resume:        the same command with --resume (the run folder must be on storage every node sees)
#   CPU (gloo):    NPROC_PER_NODE=2 workflows/train_torchrun.sh features.zarr runs/cpu --device cpu
#
# --batch-size is per process: the global batch is batch-size x processes. Every process samples its
# own disjoint share of each epoch; only rank 0 writes the run folder.
#SBATCH --job-name=dinocache-train
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 STORE OUT [dinocache train options...]" >&2
    exit 2
fi
STORE=$1
OUT=$2
shift 2

# Processes per node: one per GPU unless told otherwise.
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC_PER_NODE:-0}" -ge 1 ] || NPROC_PER_NODE=1
fi
# Keep CPU threads per process sensible (torchrun sets 1 otherwise, which starves batch gathering).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}

if [ "${SLURM_NNODES:-1}" -gt 1 ]; then
    # One torchrun per node (srun), rendezvous on the first node of the allocation.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --ntasks-per-node=1 torchrun \
        --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC_PER_NODE" \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
        -m dinocache.cli train "$STORE" --out "$OUT" --no-progress "$@"
else
    torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" \
        -m dinocache.cli train "$STORE" --out "$OUT" "$@"
fi
