"""Spread an extraction over a dask.distributed cluster: one backbone per worker, units as tasks.

The client plans the layout and creates the store (so no worker ever races on creation), then hands
out contiguous blocks of pending units. Each worker process builds its backbone once and keeps it for
every task it runs; it checks the backbone it built against the store's recorded weights before it
writes anything. Units never share a shard, so workers never touch the same file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dinocache.pipeline.extract import ExtractConfig, build_backbone, open_source, prepare, redo_damaged_units
from dinocache.pipeline.units import ExtractSummary, run_units
from dinocache.datasets import open_dataset
from dinocache.pipeline.store import FeatureStore, store_bytes

#: Per worker process: what it built once and reuses for every task (backbone, dataset source).
_WORKER_CACHE: dict[tuple, Any] = {}

#: The most units one task holds (2,048 frames at the default 256 per unit): the work is cut into at
#: least four tasks per worker connected at the start, and into blocks no larger than this, so that
#: workers joining later (SLURM jobs leave the queue one by one) still find tasks waiting.
MAX_UNITS_PER_TASK = 8


def _worker_device(cfg: ExtractConfig) -> str:
    """Spread local workers over the GPUs: worker i takes GPU i (mod count)."""
    device = cfg.resolved_device()
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    from dask.distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else abs(hash(name))
    return f"cuda:{index % torch.cuda.device_count()}"


def _extract_task(cfg: ExtractConfig, units: Sequence[int]) -> ExtractSummary:
    cfg = dataclasses.replace(cfg, device=_worker_device(cfg), progress=False)
    key = ("backbone", cfg.backbone, cfg.weights, cfg.seed, cfg.image_size, cfg.center_crop, cfg.device, cfg.precision)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build_backbone(cfg)
    backbone = _WORKER_CACHE[key]
    source_key = ("source", str(cfg.dataset), cfg.format, cfg.skip_bad_episodes)
    if source_key not in _WORKER_CACHE:
        _WORKER_CACHE[source_key] = open_dataset(cfg.dataset, format=cfg.format, skip_bad_episodes=cfg.skip_bad_episodes)
    source = _WORKER_CACHE[source_key]
    store = FeatureStore(cfg.out, mode="r+")
    store.check_identity({"weights": backbone.weights.identity()},
                         hint="the worker built different backbone weights than the client")
    done = store.done_units()
    todo = [u for u in units if not done[u]]
    return run_units(store, source, backbone, todo, cfg.batch_size, cfg.device, cfg.dtype, cfg.resolved_decode_workers())


def plan_tasks(pending: Sequence[int], workers: int) -> list[list[int]]:
    """Cut the pending units into contiguous blocks, one per task: at least four per worker connected
    now, none larger than :data:`MAX_UNITS_PER_TASK`, sizes differing by one at most."""
    n_tasks = min(len(pending), max(4 * workers, -(-len(pending) // MAX_UNITS_PER_TASK)))
    return [list(pending[i * len(pending) // n_tasks:(i + 1) * len(pending) // n_tasks]) for i in range(n_tasks)]


def extract_with_dask(cfg: ExtractConfig, scheduler: str | None = None, n_workers: int | None = None) -> ExtractSummary:
    """Run ``cfg`` on the dask scheduler at ``scheduler`` or on a new local cluster of ``n_workers``."""
    from dask.distributed import Client, LocalCluster, as_completed

    t_begin = time.perf_counter()
    cfg = dataclasses.replace(cfg, precision=cfg.resolved_precision())
    selected = open_source(cfg)  # the cheap checks first
    planner = build_backbone(dataclasses.replace(cfg, device="cpu"))
    store, summary = prepare(cfg, planner, selected)
    del planner
    redo_damaged_units(store, range(store.num_units))
    done = store.done_units()
    pending = [u for u in range(store.num_units) if not done[u]]
    summary.units_skipped = store.num_units - len(pending)

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=n_workers or 1, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(scheduler or cluster)
    try:
        workers = max(len(client.scheduler_info().get("workers", {})), 1)
        futures = {client.submit(_extract_task, cfg, block, pure=False): block for block in plan_tasks(pending, workers)}
        frames = lambda units: sum(b - a for a, b in map(store.unit_range, units))  # noqa: E731
        with tqdm(total=store.num_frames, initial=store.num_frames - frames(pending), unit="frame",
                  disable=not cfg.progress, desc=f"extract {store.path.name} (dask, {workers} workers)") as bar:
            for future in as_completed(futures):
                part = future.result()
                summary.merge(part)
                bar.update(frames(futures[future]))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    summary.bytes_written = store_bytes(store.path)
    summary.seconds = time.perf_counter() - t_begin
    return summary
