"""The run folder: what a run is (a new one from the options, or the recorded one ``--resume`` continues), and who owns it.

A run is claimed by writing its ``run.json`` (two ``train --out`` racing for one folder get one
winner); resuming refuses options that contradict the record; a run that dies before its first
checkpoint releases the folder. :class:`RunKind` is what differs between a cached, an online and a
fine-tuning run; everything in this module and after it is shared.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinocache.atomic import sweep_temporaries, temporary_name
from dinocache.errors import DinocacheError, TrainingError
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.model.checkpoint import (
    CHECKPOINTS, LAST, METRICS_FILE, MODEL_FILE, PLOT_FILE, RUN_FILE, PolicySpec, checkpoint_dir,
)
from dinocache.policy.model.config import ACTConfig
from dinocache.policy.model.integrity import read_json, write_json
from dinocache.policy.model.presets import apply_preset, check_preset_backbone, get_preset
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import EpisodeSplit, split_episodes
from dinocache.policy.training.frames import DecodedFrames
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.train_config import AUGMENT_OPTIONS, TrainConfig

__all__ = ["RunKind", "RunSetup", "resolve_act_config", "refuse_resume_changes", "open_run", "claim_run",
           "release_run", "augment_options", "RUN_OPTIONS"]


RUN_OPTIONS = ("batch_size", "seed", "val_frames", *AUGMENT_OPTIONS)


@dataclass
class RunSetup:
    """What a kind of run hands the loop: batches, the module that trains, its optimiser and its spec.

    ``data`` is :class:`CachedFeatures` or :class:`~dinocache.policy.training.frames.DecodedFrames` (frames for
    a backbone in the step); ``model(batch)`` returns the loss as :meth:`ACTHead.compute_loss` does,
    ``model.head`` is the head, and ``model.encoder``, when it has parameters that train, the backbone
    saved beside it in every checkpoint.
    """

    data: CachedFeatures | DecodedFrames
    model: nn.Module
    optimizer: torch.optim.Optimizer
    spec: PolicySpec


@dataclass
class RunKind:
    """What differs between a cached run (:func:`train`), an online one and a fine-tuning one
    (:mod:`dinocache.policy.training.finetune`); the loop, the split, resuming and checkpoints are shared.

    ``episodes`` are ``(index, start row, length, task)`` of the rows sampled; ``config()`` is a new
    run's head configuration; ``check_data(recorded)`` refuses to resume a run (its ``run.json``)
    on other data; ``build(procs, config, recorded)`` makes the :class:`RunSetup` (``recorded`` is the
    run's record when it continues one, else None); ``record`` is added to ``run.json``.
    """

    episodes: list[tuple[int, int, int, str]]
    config: Callable[[], ACTConfig]
    check_data: Callable[[dict[str, Any]], None]
    build: Callable[[Processes, ACTConfig, dict[str, Any] | None], RunSetup]
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def resolve_act_config(preset: str | None, overrides: dict[str, Any], store: FeatureStore | None) -> ACTConfig:
    """LeRobot's defaults, then the preset's overrides (after checking the store's backbone), then ``overrides``.

    ``store`` is needed only with a ``preset`` (an online run has none, and no preset).

    Setting ``chunk_size`` alone also lowers ``n_action_steps`` to it (LeRobot would refuse the pair,
    though ``n_action_steps`` only matters when the policy runs).
    """
    config = ACTConfig()
    if preset is not None:
        chosen = get_preset(preset)
        check_preset_backbone(chosen, store.record.backbone.name)
        config = apply_preset(chosen, config)
    overrides = dict(overrides)
    if "chunk_size" in overrides and "n_action_steps" not in overrides:
        overrides["n_action_steps"] = min(config.n_action_steps, overrides["chunk_size"])
    try:
        return dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as err:
        raise DinocacheError(f"ACT configuration: {err}") from None


def _check_resume(recorded: dict[str, Any], cfg: TrainConfig, split: list[int]) -> None:
    """Refuse to resume with a changed option that defines the run."""
    conflicts = []
    for name in RUN_OPTIONS:
        given, was = getattr(cfg, name), recorded["train"].get(name, AUGMENT_OPTIONS.get(name))
        if cfg.is_given(name) and given != was:
            conflicts.append(f"--{name.replace('_', '-')} {given} (the run has {was})")
    if cfg.is_given("val_episodes") and split != recorded["split"]["val"]:
        conflicts.append(f"--val-episodes selects {split} (the run validates on {recorded['split']['val']})")
    if cfg.is_given("preset") and cfg.preset != recorded["preset"]:
        conflicts.append(f"--preset {cfg.preset} (the run has {recorded['preset']})")
    for name, value in cfg.act.items():
        if recorded["act_config"].get(name) != value:
            conflicts.append(f"--{name.replace('_', '-')} {value} (the run has {recorded['act_config'].get(name)})")
    refuse_resume_changes(cfg, conflicts)


def refuse_resume_changes(cfg: TrainConfig, conflicts: list[str]) -> None:
    """Refuse, in one line naming each, options given on ``--resume`` that contradict the recorded run."""
    if conflicts:
        raise TrainingError(f"{cfg.out}: cannot resume with changed settings: {'; '.join(conflicts)}. "
                            f"Drop them, or start a new run with another --out")


def open_run(cfg: TrainConfig, kind: RunKind,
              procs: Processes) -> tuple[ACTConfig, dict[str, Any], bool, dict[str, Any] | None]:
    """What the run is: a new one built from ``cfg``, or the recorded one that ``cfg.resume`` continues.

    Returns the head configuration, the options that define the run (``preset``, ``batch_size``,
    ``seed``, ``val_frames``, ``split``), whether a checkpoint is to be loaded, and the run's record
    when it continues one: a recorded run with no checkpoint yet (its process was killed before the
    first one) starts again from step 0 with its recorded options. Every process decides the same
    before rank 0 writes anything (hence the barrier).
    """
    run_dir = Path(cfg.out)
    split = split_episodes([index for index, *_ in kind.episodes], cfg.val_episodes)
    has_checkpoint = (checkpoint_dir(run_dir, LAST) / MODEL_FILE).is_file()
    recorded = None
    if cfg.resume:
        if not (run_dir / RUN_FILE).is_file():
            raise TrainingError(f"{run_dir}: nothing to resume (no {RUN_FILE}); start the run without --resume")
        recorded = read_json(run_dir / RUN_FILE)
        _check_resume(recorded, cfg, split.val)
        kind.check_data(recorded)
        config = ACTConfig.from_dict(recorded["act_config"])
        options = {**augment_options(cfg, recorded), **recorded["train"], "preset": recorded["preset"],
                   "split": EpisodeSplit(**recorded["split"])}
    else:
        if (run_dir / RUN_FILE).exists():
            how = ("continue it" if has_checkpoint else
                   "start it again with its recorded options (it stopped before its first checkpoint)")
            raise TrainingError(f"{run_dir} already holds a training run; pass --resume to {how}, "
                                f"or choose another --out")
        config = kind.config()
        options = {"batch_size": cfg.batch_size, "seed": cfg.seed, "val_frames": cfg.val_frames,
                   "preset": cfg.preset, "split": split, **augment_options(cfg, None)}
    procs.barrier()
    return config, options, cfg.resume and has_checkpoint, recorded


def claim_run(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` only if no other run has: two ``train --out`` racing for one folder get one winner.

    The record is written whole beside it and hard-linked into place, which fails if the name exists.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(run_dir / RUN_FILE)  # a claim killed between its write and its link
    tmp = temporary_name(run_dir / RUN_FILE)
    try:
        write_json(tmp, record)
    except OSError:  # a full disk: the folder made for the run goes again
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    try:
        os.link(tmp, run_dir / RUN_FILE)
    except FileExistsError:
        raise TrainingError(f"{run_dir} already holds a training run (another process just started it); "
                            f"choose another --out") from None
    finally:
        tmp.unlink()


def release_run(run_dir: Path) -> None:
    """Undo :func:`claim_run` for a run that died before its first checkpoint: with nothing to resume,
    its record would only lock the folder. The folder goes too when nothing else is left in it."""
    for name in (RUN_FILE, METRICS_FILE, PLOT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def augment_options(cfg: TrainConfig, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The run's augmentation on the cache: the recorded run's when it continues one (a run recorded
    before these options had none of it), else ``cfg``'s."""
    if recorded is not None:
        return {name: recorded["train"].get(name, default) for name, default in AUGMENT_OPTIONS.items()}
    return {name: getattr(cfg, name) for name in AUGMENT_OPTIONS}
