"""Extract on a SLURM cluster through dask-jobqueue: one GPU worker per job, units as dask tasks.

    pip install dask-jobqueue
    python workflows/extract_dask_jobqueue.py /data/aloha_sim /scratch/features.zarr --jobs 8

The script starts the workers as SLURM jobs, then runs the very same code path as
`dinocache extract --dask-scheduler ADDR`: the client creates the store, each worker loads the
backbone once and fills whole work units. Re-running after a failure skips the finished units.
"""

import argparse
from pathlib import Path

from dask.distributed import Client
from dask_jobqueue import SLURMCluster

from dinocache.pipeline.distributed import extract_with_dask
from dinocache.pipeline.extract import ExtractConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--backbone", default="dinov2_vitb14_reg")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs = GPU workers")
    parser.add_argument("--partition", default=None)
    args = parser.parse_args()

    cluster = SLURMCluster(
        cores=8, processes=1, memory="32GB", walltime="04:00:00", queue=args.partition,
        job_extra_directives=["--gres=gpu:1"], job_script_prologue=["export HF_HUB_OFFLINE=1"],
    )
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        client.wait_for_workers(1)
        cfg = ExtractConfig(dataset=args.dataset, out=args.store, backbone=args.backbone, weights=args.weights,
                            device="cuda", precision="bf16")
        print(extract_with_dask(cfg, scheduler=cluster.scheduler_address).format())
    cluster.close()


if __name__ == "__main__":
    main()
