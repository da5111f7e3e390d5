"""Stage two: train an ACT head on a feature store (``dinocache train``).

The backbone ran once, at extraction; here every step is a gather from cached features plus the
head's forward and backward, so a step costs what the head costs. The loop, :func:`train`, is
deliberately plain: one process per device, DDP when launched by ``torchrun``, bfloat16 autocast on
CUDA, AdamW at a constant learning rate with gradient clipping (LeRobot's ACT recipe), periodic
validation on held-out episodes, checkpoints that resume bit-exactly.

Read top-down, a run goes through one module per job:

* :mod:`~dinocache.policy.training.run`: the run folder: a new run, or the recorded one ``--resume``
  continues, claimed by its ``run.json``;
* :mod:`~dinocache.policy.training.data` (or :mod:`~dinocache.policy.training.frames` with the backbone
  in the step): the episodes split, features in memory or streamed, the sample order, the batches;
* :mod:`~dinocache.policy.training.step`: one optimiser step that never waits for the host, on CUDA
  one CUDA graph;
* :mod:`~dinocache.policy.training.loop`: steps, validation (:mod:`~dinocache.policy.training.validation`),
  records (:mod:`~dinocache.policy.training.metrics`);
* :mod:`~dinocache.policy.training.checkpointing`: checkpoints written and loaded back to resume, in
  the layout of :mod:`dinocache.policy.model.checkpoint`.

This module wires them: :func:`train` for a cached run, :func:`run_training` for any kind
(``train --online`` and ``finetune`` in :mod:`~dinocache.policy.training.finetune`). The user guide
is ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from dinocache.devices import available_device_memory, check_batch_fits, parse_memory_budget
from dinocache.errors import TrainingError, os_error_line
from dinocache.pipeline.store import StoreRecord
from dinocache.policy.model.act import ACTHead, act_optimizer
from dinocache.policy.model.checkpoint import LAST, METRICS_FILE, PolicySpec, checkpoint_dir
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.training.checkpointing import keep_fused, load_training_state, restore_rng
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import action_windows, episode_rows, open_training_store
from dinocache.policy.training.feature_augment import FeatureAugment
from dinocache.policy.training.loop import TrainResult, run_steps, sampler_state, trained_encoder
from dinocache.policy.training.metrics import truncate_metrics
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.run import (
    RUN_OPTIONS, RunKind, RunSetup, augment_options, claim_run, open_run, release_run, resolve_act_config,
)
from dinocache.policy.training.step import LossModule
from dinocache.policy.training.train_config import TrainConfig
from dinocache.policy.training.validation import mean_action_l1

__all__ = ["TrainConfig", "TrainResult", "train", "run_training"]


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or, with ``cfg.resume``, continue training) an ACT head on the feature store ``cfg.store``.

    Launched by ``torchrun``, every process runs this; they share the work by DDP and only rank 0
    writes to the run folder.
    """
    store = open_training_store(cfg.store)

    def check_data(recorded: dict[str, Any]) -> None:
        store.check_identity(StoreRecord.from_dict(recorded["store"]["provenance"]).identity(),
                             hint=f"the run {cfg.out} was trained on another feature store")

    def build(procs: Processes, config: ACTConfig, recorded: dict[str, Any] | None) -> RunSetup:
        device = procs.device
        augment = augment_options(cfg, recorded)
        data = CachedFeatures(store, config.chunk_size, config.use_cls_token,
                              parse_memory_budget(cfg.memory_budget, procs.local_world_size), device=device,
                              device_budget=parse_memory_budget(cfg.device_memory_budget,
                                                                available=lambda: available_device_memory(device),
                                                                option="--device-memory-budget"),
                              window_frames=cfg.window_frames, progress=cfg.progress and procs.main,
                              view_sampling=augment["view_sampling"])
        stats = {k: {n: v.tolist() for n, v in s.items()} for k, s in data.stats.items()}
        spec = PolicySpec(config, data.inputs, stats, str(store.path.resolve()), store.record, data.camera_keys,
                          cfg.preset if recorded is None else recorded["preset"])
        model = LossModule(ACTHead(config, data.inputs).to(device),
                           FeatureAugment(augment["grid_shift"], augment["patch_dropout"]))
        return RunSetup(data, model, act_optimizer(list(model.parameters()), config), spec)

    return run_training(cfg, RunKind(store.episodes(), lambda: resolve_act_config(cfg.preset, cfg.act, store),
                                     check_data, build))


def run_training(cfg: TrainConfig, kind: RunKind) -> TrainResult:
    """Run (or continue) a run of any kind: the part :func:`train`, ``train --online`` and ``finetune`` share."""
    procs = Processes.setup(cfg.device)
    try:
        return _train(cfg, procs, kind)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: one line saying what is kept
        reason = os_error_line(err) if isinstance(err, OSError) else str(err).removeprefix("Error while serializing: ")
        last = checkpoint_dir(Path(cfg.out), LAST)
        kept = (f"the last checkpoint (step {int(last.resolve().name)}) is kept: fix this and continue with --resume"
                if last.exists() else "no checkpoint was written")
        raise TrainingError(f"{cfg.out}: training stopped: {reason}; {kept}") from err
    finally:
        procs.teardown()


def _train(cfg: TrainConfig, procs: Processes, kind: RunKind) -> TrainResult:
    t_begin = time.perf_counter()
    run_dir = Path(cfg.out)
    config, options, resuming, recorded = open_run(cfg, kind, procs)
    seed, split = options["seed"], options["split"]

    # Data (normalised low-dim arrays; features in RAM or streamed, or frames), model and optimiser.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    setup = kind.build(procs, config, recorded)
    data, model, optimizer, spec = setup.data, setup.model, setup.optimizer, setup.spec
    _check_batch_fits(options["batch_size"], model.head.config, spec.inputs, procs.device)
    encoder = trained_encoder(model)
    train_rows, val_rows = (episode_rows(kind.episodes, part) for part in (split.train, split.val))
    if len(val_rows) > options["val_frames"]:  # a fixed, evenly spread subset keeps evaluation cheap
        val_rows = val_rows[np.linspace(0, len(val_rows) - 1, options["val_frames"]).round().astype(np.int64)]
    baseline = mean_action_l1(data, train_rows, val_rows) if len(val_rows) else None

    # Fresh, or from the last checkpoint (weights, moments, RNG, sampler position).
    step, best_val = 0, math.inf
    if resuming:
        state = load_training_state(checkpoint_dir(run_dir, LAST), model.head, optimizer, backbone=encoder)
        keep_fused(optimizer)
        step, best_val = state["step"], state.get("best_val_l1") or math.inf
        if len(state["rng"]) == procs.world_size:
            restore_rng(state["rng"][procs.rank])
        else:  # another number of processes: the run goes on, but not as the original would have
            torch.manual_seed(seed + 7919 * step + procs.rank)
        if procs.main:
            truncate_metrics(run_dir / METRICS_FILE, step)
            if {**state["sampler"], "position": 0} != sampler_state(data, seed, 0, procs.world_size):
                tqdm.write("dinocache: note: the number of processes or the feature access (in memory vs streamed) "
                           "changed since the checkpoint, so the data order differs from the original run's")
    else:
        if procs.rank:
            torch.manual_seed(seed + procs.rank)  # same initial weights (DDP broadcasts rank 0's), own noise
        if procs.main and cfg.resume:  # a recorded run that died before its first checkpoint starts again
            truncate_metrics(run_dir / METRICS_FILE, 0)
        elif procs.main:
            claim_run(run_dir, {**spec.to_dict(), "train": {k: options[k] for k in RUN_OPTIONS},
                                 "split": dataclasses.asdict(split), "world_size": procs.world_size,
                                 "baseline_val_l1": baseline, **kind.record})
    if procs.main and baseline is not None:
        tqdm.write(f"dinocache: {len(split.train)} train / {len(split.val)} val episodes; validation L1 of "
                   f"predicting the mean action: {baseline:.4f} (what the head has to beat)")
    if procs.main and step == 0 and (warning := _padding_warning(data, train_rows, kind.episodes)):
        tqdm.write(warning)
    try:
        return run_steps(cfg, procs, data, model, optimizer, spec, options, train_rows, val_rows, baseline, step, best_val,
                     t_begin)
    except BaseException:
        if procs.main and not checkpoint_dir(run_dir, LAST).exists():
            release_run(run_dir)
        raise


def _padding_warning(data: CachedFeatures, rows: np.ndarray, episodes: list[tuple[int, int, int, str]]) -> str | None:
    """A warning when the action chunk is longer than every episode: most of each window is then padding."""
    longest = max(length for _, _, length, _ in episodes)
    if data.chunk_size <= longest or not len(rows):
        return None
    _, is_pad = action_windows(torch.from_numpy(rows), data.episode_end, data.chunk_size)
    return (f"dinocache: warning: --chunk-size {data.chunk_size} is longer than every episode (the longest has "
            f"{longest} frames): {100 * is_pad.float().mean().item():.0f}% of the training action windows is "
            f"padding, which the loss ignores; a chunk shorter than the episodes trains on more real actions")


def _check_batch_fits(batch_size: int, config: ACTConfig, inputs: ACTInputs, device: torch.device) -> None:
    """Refuse a batch that cannot fit before any of it is allocated (the kernel would kill the process
    without a word). A lower bound per sample: its cached features, and the feed-forward activations
    each transformer layer keeps for the backward pass (the encoder's over the observation tokens, the
    decoder's over the chunk, the CVAE encoder's over the chunk and two more), at two bytes a value."""
    tokens = sum(h * w for _, _, h, w in inputs.cameras) + 2 + (inputs.env_state_dim is not None)
    features = 2 * sum(c * h * w for _, c, h, w in inputs.cameras)
    rows = (config.n_encoder_layers * tokens + config.n_decoder_layers * config.chunk_size
            + config.use_vae * config.n_vae_encoder_layers * (config.chunk_size + 2))
    activations = 2 * rows * config.dim_feedforward
    check_batch_fits("--batch-size", batch_size, features + activations, device,
                     "the cached features and the transformer activations of one training step")
