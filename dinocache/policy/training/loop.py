"""The training loop: steps from where the run is to ``--steps``, with validation, records and checkpoints.

The host only queues work: a batch (gathered on the device, or copied there ahead of time), then
the step. It reads the device once per record; a step that would make the weights non-finite stops
the run there, naming it, with the weights as they were before it.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dinocache.errors import TrainingError
from dinocache.policy.model.checkpoint import BEST, LAST, METRICS_FILE, PLOT_FILE, RUN_FILE, PolicySpec, checkpoint_dir, checkpoint_step
from dinocache.policy.model.integrity import read_json
from dinocache.policy.training.checkpointing import capture_rng, save_checkpoint
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.frames import DecodedFrames
from dinocache.policy.training.metrics import Meter, MetricsLog, plot_metrics
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.step import TrainStep
from dinocache.policy.training.tracking import open_trackers
from dinocache.policy.training.train_config import TrainConfig
from dinocache.policy.training.validation import Validation

__all__ = ["TrainResult", "run_steps", "sampler_state", "trained_encoder", "batch_source"]


@dataclass
class TrainResult:
    """What a run ended with (rank 0's view; other ranks get the same numbers)."""

    run_dir: Path
    step: int
    metrics: dict[str, Any] | None
    best_val_l1: float | None
    baseline_val_l1: float | None
    batches: str  # where batches came from: features in memory or streamed, or decoded frames
    seconds: float

    def format(self) -> str:
        lines = [f"run         {self.run_dir}", f"steps       {self.step} in {self.seconds:.1f} s "
                 f"({self.batches})"]
        if self.metrics:
            m = self.metrics
            lines.append(f"last        loss {m['loss']:.4f}  l1 {m['l1']:.4f}  {m['steps_per_s']:.1f} steps/s  "
                         f"data {100 * m['data_fraction']:.1f}% of step time")
        if self.best_val_l1 is not None:
            lines.append(f"validation  best L1 {self.best_val_l1:.4f} vs {self.baseline_val_l1:.4f} "
                         f"predicting the mean action")
        lines.append(f"checkpoints {checkpoint_dir(self.run_dir, LAST)}" +
                     (f", {checkpoint_dir(self.run_dir, BEST)}" if self.best_val_l1 is not None else ""))
        return "\n".join(lines)


def run_steps(cfg: TrainConfig, procs: Processes, data: CachedFeatures | DecodedFrames, model: nn.Module,
          optimizer: torch.optim.Optimizer, spec: PolicySpec, options: dict[str, Any], train_rows: np.ndarray,
          val_rows: np.ndarray, baseline: float | None, step: int, best_val: float, t_begin: float) -> TrainResult:
    """The training steps from ``step`` to ``cfg.steps``, with validation, logging and checkpoints.

    ``model(batch)`` is the loss (:class:`RunSetup`); its head, and its backbone when that trains,
    are what checkpoints save.

    The host only queues work: a batch (gathered on the device, or copied there ahead of time), then
    the step (:class:`TrainStep`). It reads the device once per record. A step whose gradient norm is
    not finite (a NaN or inf loss, or an overflow in the backward pass) is skipped on the device, and
    so is every later one; the next record sees it and stops the run, naming that step, with the
    weights as they were before it: after one such update every weight is NaN, and a head trained on
    to the end would export actions that are NaN. The norm is taken after DDP's all-reduce, so every
    process stops at the same step.
    """
    device, run_dir = procs.device, Path(cfg.out)
    batch_size, seed = options["batch_size"], options["seed"]
    # One process on CUDA: the step and the validation are CUDA graphs. Not under DDP, whose gradient
    # all-reduce hooks would have to be captured too; nor with a backbone in the step (its batches are
    # frames decoded on the host). With --compile the graph holds Inductor's fused kernels: the
    # compilation happens in the eager warm-up calls, the capture records what they launch.
    graph = (cfg.cuda_graph and device.type == "cuda" and procs.world_size == 1
             and isinstance(data, CachedFeatures))
    if cfg.compile:
        model.head.compile()
    parallel = model
    if procs.world_size > 1:
        parallel = nn.parallel.DistributedDataParallel(model,
                                                       device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(model.head, optimizer, data.batch_buffers(batch_size, device), graph=graph, model=parallel)
    validate = Validation(model, data, val_rows, max(4 * batch_size, 32), procs, graph) if len(val_rows) else None
    encoder = trained_encoder(model)

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and procs.main),
               desc=f"train {run_dir.name}", dynamic_ncols=True)
    trackers = open_trackers(cfg.log_to, run_dir, read_json(run_dir / RUN_FILE)) if procs.main else []
    log = MetricsLog(run_dir / METRICS_FILE, bar, batch_source(data), trackers) if procs.main else None
    order = data.sample_order(train_rows, seed, procs.rank, procs.world_size)
    batches = data.train_batches(order, batch_size, position=step * batch_size, out=train_step.inputs)
    model.train()
    meter = Meter()
    best_only: Path | None = None  # a checkpoint written only because its validation was the best so far
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            next(batches)  # into train_step.inputs
            meter.data_s += time.perf_counter() - t0
            train_step()
            step += 1
            meter.steps += 1
            bar.update(1)

            save = step % cfg.save_every == 0 or step == cfg.steps
            evaluated = validate is not None and (save or step % cfg.eval_every == 0)
            if not (save or evaluated or step % cfg.log_every == 0):
                continue
            sums, bad = train_step.take()  # waits for the device: the wall clock is honest
            wall_s = time.perf_counter() - meter.began
            if bad is not None:
                raise TrainingError(_diverged(run_dir, step - meter.steps + bad[0], bad[1], bad[2]))
            val_l1 = validate() if evaluated else None
            record = meter.record(step, sums, wall_s, val_l1, step * batch_size * procs.world_size, procs)
            if log is not None:
                log.write(record, val_l1)
            # Every validation may make a new best, not only those at a scheduled checkpoint: a best
            # seen between checkpoints is saved then (and the one it supersedes, if it was saved only
            # for being best, removed), so that `best` is the best validation the run saw.
            is_best = evaluated and val_l1 < best_val
            best_val = min(best_val, val_l1) if evaluated else best_val
            if save or is_best:
                rng = procs.gather(capture_rng())
                if procs.main:
                    written = save_checkpoint(run_dir, step, model.head, data.normalizer, spec, optimizer, rng,
                                              sampler=sampler_state(data, seed, step * batch_size, procs.world_size),
                                              extra={"best_val_l1": None if math.isinf(best_val) else best_val},
                                              best=is_best, backbone=encoder)
                    if is_best and best_only is not None:
                        shutil.rmtree(best_only, ignore_errors=True)
                    if is_best:
                        best_only = None if save else written
            meter.restart()
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
    if procs.main and (run_dir / METRICS_FILE).is_file():
        plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE, baseline)
    return TrainResult(run_dir, step, log.last if log else None, None if math.isinf(best_val) else best_val,
                       baseline, batch_source(data), time.perf_counter() - t_begin)


def _diverged(run_dir: Path, step: int, loss: float, grad_norm: float) -> str:
    """The one line that stops a run whose step ``step`` would make the weights non-finite."""
    last = checkpoint_dir(run_dir, LAST)
    kept = (f"the last good checkpoint is {last} (step {checkpoint_step(last)})" if last.exists()
            else "there was no checkpoint yet, so the run folder is released")
    return (f"{run_dir}: training diverged at step {step}: loss {loss:g}, gradient norm {grad_norm:g}; stopped "
            f"before updating the weights, {kept}. Lower --lr, or check the store with `dinocache inspect`")


def trained_encoder(model: nn.Module) -> nn.Module | None:
    """The backbone that trains with the head (saved beside it), or None when it is frozen or cached."""
    encoder = getattr(model, "encoder", None)
    return encoder if encoder is not None and any(p.requires_grad for p in encoder.parameters()) else None


def batch_source(data: CachedFeatures | DecodedFrames) -> str:
    """Where a run's batches come from, as the summary and the data-loading warning say it."""
    if isinstance(data, DecodedFrames):
        return "frames decoded"
    return "features in memory" if data.in_memory else "features streamed"


def sampler_state(data: CachedFeatures, seed: int, position: int, world_size: int) -> dict[str, Any]:
    """All the sampler is (see :class:`~dinocache.policy.training.sampling.SampleOrder`): a checkpoint stores it."""
    return {"seed": seed, "position": position, "world_size": world_size,
            "window_chunks": None if data.in_memory else data.window_chunks}
