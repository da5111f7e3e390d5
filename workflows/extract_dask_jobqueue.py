"""Extract on a SLURM cluster through dask-jobqueue: one worker per SLURM job, work units as dask tasks.

    pip install dask-jobqueue
    python workflows/extract_dask_jobqueue.py /data/aloha_sim /scratch/features.zarr --jobs 8 \\
        -- --backbone dinov2_vitb14_reg --weights /shared/weights/dinov2_vitb14_reg.safetensors

The script submits the worker jobs, waits for them (up to --wait seconds; late jobs still join and
take work as they start), then runs `dinocache extract DATASET --out STORE --dask-scheduler ADDR`
with every option given after `--`: the very same code path and options as on one machine. The
client creates the store, each worker builds the backbone once and fills whole work units. Re-run
the same command after a failure: finished units are skipped. The jobs are cancelled at the end,
whatever happened.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dask.distributed import Client
from dask_jobqueue import SLURMCluster


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options, and the `dinocache extract` options after `--`."""
    ours, extract_options = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset path or Hub id, as for `dinocache extract`")
    parser.add_argument("store", type=Path)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs, one dask worker each (default 4)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per job (--gres=gpu:N); 0 for CPU jobs")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per job: decoding runs on them (default 8)")
    parser.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for all jobs to start (default 600)")
    return parser.parse_args(ours), extract_options


def main(argv: list[str] | None = None) -> None:
    args, extract_options = parse_args(sys.argv[1:] if argv is None else argv)
    gpu = [f"--gres=gpu:{args.gpus}"] if args.gpus else []
    # One worker with one task thread per job (cores=1), the job's cores booked for it (job_cpu): a
    # task is a block of units that uses the whole job, its GPU and its cores through the decode workers.
    cluster = SLURMCluster(
        cores=1, processes=1, job_cpu=args.cores, memory=args.memory, walltime=args.walltime,
        queue=args.partition, account=args.account, job_extra_directives=gpu,
        job_script_prologue=["export HF_HUB_OFFLINE=1"],
    )
    try:
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            try:
                client.wait_for_workers(args.jobs, timeout=args.wait)
            except TimeoutError:
                started = len(client.scheduler_info()["workers"])
                print(f"{started} of {args.jobs} jobs started within {args.wait:g} s; starting with those",
                      file=sys.stderr)
                client.wait_for_workers(1)
            from dinocache.cli import main as dinocache

            device = [] if "--device" in extract_options else ["--device", "cuda" if args.gpus else "cpu"]
            # click's standalone mode: one-line errors, and the exit status of `dinocache extract`.
            dinocache(["extract", args.dataset, "--out", str(args.store), "--dask-scheduler",
                       cluster.scheduler_address, *device, *extract_options])
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
