"""Run folders and checkpoints of ``dinocache train``: their layout, and how to read them back.

Training writes them (:mod:`dinocache.policy.training.checkpointing`); training (to resume or
fine-tune) and stage three (to fuse and export) read them through this module.

Layout of a run folder::

    runs/act1/
      run.json                      the policy spec (below) plus the training options and the baseline
      metrics.jsonl                 one JSON record per logged step
      loss.png                      loss curves, written at the end
      checkpoints/
        000500/
          model.safetensors         head weights (``head.*``) and normalisation buffers (``normalizer.*``)
          config.json               the policy spec and the step
          training_state.safetensors  optimiser tensors and torch RNG states (per rank)
          training_state.json       step, optimiser hyperparameters, numpy/python RNG states, sampler position
        last -> 000500              symlink (a copy where symlinks are not possible)
        best -> 000500              the checkpoint with the lowest validation L1

The *policy spec* is everything the export stage needs to rebuild the exact head and the exact
backbone in front of it: the :class:`ACTConfig`, the :class:`ACTInputs`, the normalisation
statistics, the feature store's path and full provenance (backbone, weights hash,
preprocessing), and which dataset camera feeds which head camera (``camera_keys``, e.g.
``{"top": "observation.images.top"}``).

Everything is safetensors or JSON: a checkpoint loads without unpickling anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from dinocache import __version__
from dinocache.encoders.weights import tensor_sha256
from dinocache.errors import DinocacheError
from dinocache.pipeline.store import StoreRecord
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.model.integrity import IntegrityError, read_checked, read_json
from dinocache.policy.model.normalize import Normalizer

__all__ = [
    "PolicySpec", "load_head", "load_tensors", "resolve_checkpoint", "checkpoint_step", "checkpoint_dir",
    "load_backbone", "read_config", "RUN_FILE", "METRICS_FILE", "CHECKPOINTS", "LAST", "BEST", "BACKBONE_FILE",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINTS = "checkpoints"
LAST = "last"
BEST = "best"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
#: A trained backbone's tensors (``dinocache train --online``, ``dinocache finetune``), beside the head's.
BACKBONE_FILE = "backbone.safetensors"


@dataclass
class PolicySpec:
    """What a trained head is: its hyperparameters, its inputs, its normalisation, its features' origin.

    ``backbone_training`` is None for a head trained on cached features (the backbone in front of it
    is the store's, frozen); for a run that trained its backbone (online or fine-tuned) it says how
    (:class:`~dinocache.policy.model.trainable.BackboneTraining`), and each checkpoint holds the trained
    tensors (:data:`BACKBONE_FILE`). An online run has no store: ``store_path`` is None and
    ``store_record`` describes the frames it was fed (dataset, backbone, preprocessing) instead.
    """

    config: ACTConfig
    inputs: ACTInputs
    stats: dict[str, dict[str, list[float]]]  # key -> {mean, std, min, max}, as stored (before the std floor)
    store_path: str | None
    store_record: StoreRecord
    camera_keys: dict[str, str]  # head camera name -> store camera (dataset key), in store order
    preset: str | None = None
    backbone_training: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dinocache_version": __version__,
            "act_config": self.config.to_dict(),
            "act_inputs": self.inputs.to_dict(),
            "normalization": self.stats,
            "store": {"path": self.store_path, "provenance": self.store_record.to_dict()},
            "camera_keys": self.camera_keys,
            "preset": self.preset,
            **({"backbone_training": self.backbone_training} if self.backbone_training is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicySpec:
        return cls(
            config=ACTConfig.from_dict(data["act_config"]),
            inputs=ACTInputs.from_dict(data["act_inputs"]),
            stats={k: {n: list(v) for n, v in s.items()} for k, s in data["normalization"].items()},
            store_path=data["store"]["path"],
            store_record=StoreRecord.from_dict(data["store"]["provenance"]),
            camera_keys=dict(data["camera_keys"]),
            preset=data.get("preset"),
            backbone_training=data.get("backbone_training"),
        )

    def build(self) -> tuple[ACTHead, Normalizer]:
        """A freshly initialised head and the normaliser for these statistics."""
        return ACTHead(self.config, self.inputs), Normalizer(self.stats)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, which: str | int) -> Path:
    """``checkpoints/<step>`` (zero-padded so that names sort by step), ``last`` or ``best``."""
    name = f"{which:06d}" if isinstance(which, int) else which
    return Path(run_dir) / CHECKPOINTS / name


def _resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself or from a run folder (meaning its ``last`` checkpoint)."""
    return resolve_checkpoint(path, LAST)


def resolve_checkpoint(path: str | os.PathLike, which: str | int = LAST) -> Path:
    """The checkpoint folder ``which`` (``last``, ``best`` or a step) of run folder ``path``.

    ``path`` may also be a checkpoint folder itself, in which case ``which`` is not used.
    A missing checkpoint is refused naming the ones the run has.
    """
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        name = str(which)
        target = checkpoint_dir(path, int(name) if name.isdigit() else name)
        if not target.exists():
            have = ", ".join(sorted(p.name for p in (path / CHECKPOINTS).iterdir() if not p.name.startswith(".")))
            raise DinocacheError(f"{path}: no checkpoint {name!r} (the run has: {have or 'none'})")
        path = target
    if not (path / MODEL_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise DinocacheError(f"{path}: not a dinocache run or checkpoint (no {MODEL_FILE} and {CONFIG_FILE})")
    return path


def load_head(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ACTHead, Normalizer, PolicySpec]:
    """The trained head (in eval mode), its normaliser and its spec, from a checkpoint or run folder.

    Only the head: the live policy, backbone included, is :func:`dinocache.load_policy`.
    """
    path = _resolve(path)
    config = read_config(path)
    spec = PolicySpec.from_dict(config)
    head, normalizer = spec.build()
    weights = load_tensors(path, MODEL_FILE, config)
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    normalizer.load_state_dict({k[len("normalizer."):]: v for k, v in weights.items() if k.startswith("normalizer.")})
    return head.to(device).eval(), normalizer.to(device), spec


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's (or a run's ``last``) ``config.json``, its digest checked."""
    return read_json(_resolve(path) / CONFIG_FILE)


def load_tensors(folder: Path, name: str, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, once its size and sha256 are the recorded ones."""
    data = read_checked(folder / name, config.get("files", {}).get(name))
    try:
        return load_safetensors(data)
    except SafetensorError as err:  # its digest matched: written broken, which save_file does not do
        raise IntegrityError(f"{folder / name}: not a safetensors file ({err})") from None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The training step a checkpoint (or a run's ``last``) was written at."""
    return int(read_config(path)["step"])


def load_backbone(path: str | os.PathLike, backbone: nn.Module) -> dict[str, Any]:
    """Load a checkpoint's trained backbone tensors into ``backbone`` (built as it was trained); return
    their record. The file's sha256 and the loaded tensors' hash must be the recorded ones, and the
    record's base weights those ``backbone`` was built from: otherwise it is refused showing both."""
    path = _resolve(path)
    config = read_config(path)
    record = config.get("backbone_weights")
    if record is None:
        raise DinocacheError(f"{path}: the run did not train its backbone (no {BACKBONE_FILE})")
    base = backbone.weights.identity()
    if base != record["base"]:
        raise DinocacheError(f"{path}: the backbone was trained from base weights {record['base']}, not {base}")
    backbone.model.load_state_dict(load_tensors(path, BACKBONE_FILE, config))
    loaded = tensor_sha256(backbone.model)
    if loaded != record["tensor_sha256"]:
        raise DinocacheError(f"{path / BACKBONE_FILE} loads tensors with tensor_sha256 {loaded}, the checkpoint "
                             f"recorded {record['tensor_sha256']}")
    return record
