"""Run folders and checkpoints of ``dinocache train``: what is written, and how to read it back.

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
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file
from torch import nn

from dinocache import __version__
from dinocache.encoders.weights import tensor_sha256
from dinocache.errors import DinocacheError
from dinocache.policy.integrity import IntegrityError, file_record, read_checked, read_json, write_json
from dinocache.pipeline.store import StoreRecord
from dinocache.policy.act import ACTHead
from dinocache.policy.config import ACTConfig, ACTInputs
from dinocache.policy.normalize import Normalizer

__all__ = [
    "PolicySpec", "save_checkpoint", "load_head", "load_training_state", "resolve_checkpoint", "checkpoint_step",
    "checkpoint_dir", "capture_rng", "restore_rng", "load_backbone", "read_config", "RUN_FILE", "METRICS_FILE", "CHECKPOINTS", "LAST",
    "BEST", "BACKBONE_FILE",
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
    (:class:`~dinocache.policy.trainable.BackboneTraining`), and each checkpoint holds the trained
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
# RNG state
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and python RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (also accepts the JSON round trip written in checkpoints)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"], key=np.asarray(numpy_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, which: str | int) -> Path:
    """``checkpoints/<step>`` (zero-padded so that names sort by step), ``last`` or ``best``."""
    name = f"{which:06d}" if isinstance(which, int) else which
    return Path(run_dir) / CHECKPOINTS / name


def _point(link: Path, target: Path) -> None:
    """Make ``link`` name ``target`` (a sibling), replacing what was there, as atomically as the FS allows."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.symlink_to(target.name, target_is_directory=True)
    except OSError:  # no symlinks on this filesystem: a copy does
        shutil.copytree(target, tmp)
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)


def save_checkpoint(run_dir: Path, step: int, head: nn.Module, normalizer: Normalizer, spec: PolicySpec,
                    optimizer: torch.optim.Optimizer, rng: list[dict[str, Any]], sampler: Mapping[str, Any],
                    extra: Mapping[str, Any], best: bool = False, backbone: nn.Module | None = None) -> Path:
    """Write ``checkpoints/<step>`` and point ``last`` (and ``best`` when asked) at it.

    A trained ``backbone`` (a :class:`~dinocache.policy.trainable.TrainableBackbone`) is saved whole
    as :data:`BACKBONE_FILE`; ``config.json`` records its sha256 and tensor hash beside the hashes of
    the base weights it started from (``backbone_weights``), so that export can prove what it fuses.

    ``rng`` has one :func:`capture_rng` entry per rank, so every rank resumes its own dropout and
    latent-noise stream. The checkpoint is assembled in a hidden folder and renamed into place: a run
    killed while saving leaves the previous ``last`` intact (and the hidden folder, swept by the next
    save); one that fails to save (a full disk) deletes it at once.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    _sweep_temporaries(final.parent)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, step, head, normalizer, spec, optimizer, rng, sampler, extra, backbone)
    except BaseException:  # a full disk, a kill: the previous checkpoints stay as they were, nothing half-made
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(checkpoint_dir(run_dir, LAST), final)
    if best:
        _point(checkpoint_dir(run_dir, BEST), final)
    return final


def _sweep_temporaries(checkpoints: Path) -> None:
    """Delete what a save killed outright (SIGKILL, a lost node) left: hidden ``.NAME.tmp`` folders and
    links. Only the process that claimed the run writes its checkpoints, so none is in use."""
    for leftover in checkpoints.glob(".*.tmp") if checkpoints.is_dir() else ():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _write_checkpoint(tmp: Path, step: int, head: nn.Module, normalizer: Normalizer, spec: PolicySpec,
                      optimizer: torch.optim.Optimizer, rng: list[dict[str, Any]], sampler: Mapping[str, Any],
                      extra: Mapping[str, Any], backbone: nn.Module | None) -> None:
    """Every file of a checkpoint, into the folder ``tmp``; ``config.json`` last (see :func:`save_checkpoint`)."""

    weights = {f"head.{k}": v for k, v in head.state_dict().items()}
    weights.update({f"normalizer.{k}": v for k, v in normalizer.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / MODEL_FILE,
              metadata={"format": "dinocache-act", "step": str(step)})
    trained = _save_backbone(tmp, backbone) if backbone is not None else {}

    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, Any] = {}
    for pid, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                state_meta.setdefault(str(pid), {})[name] = value
    rng_json = []
    for rank, entry in enumerate(rng):
        tensors[f"rng.{rank}.torch"] = entry["torch"]
        for device, value in enumerate(entry.get("cuda", [])):
            tensors[f"rng.{rank}.cuda.{device}"] = value
        rng_json.append({"numpy": entry["numpy"], "python": entry["python"],
                         "cuda_devices": len(entry.get("cuda", []))})
    save_file(tensors, tmp / STATE_TENSORS)
    write_json(tmp / STATE_JSON, {
        "step": step,
        "optimizer": {"param_groups": optimizer.state_dict()["param_groups"], "state": state_meta},
        "rng": rng_json,
        "sampler": dict(sampler),
        **extra,
    })
    # written last: the size and sha256 of every file above, which every reader checks before using it
    files = {name: file_record(tmp / name) for name in (MODEL_FILE, BACKBONE_FILE, STATE_TENSORS, STATE_JSON)
             if (tmp / name).is_file()}
    if trained:
        trained["backbone_weights"]["sha256"] = files[BACKBONE_FILE]["sha256"]
    write_json(tmp / CONFIG_FILE, {**spec.to_dict(), "step": step, **trained, "files": files})


def _save_backbone(folder: Path, backbone: nn.Module) -> dict[str, Any]:
    """Write the trained backbone's tensors; return its record for ``config.json``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()},
              folder / BACKBONE_FILE, metadata={"format": "dinocache-backbone", "name": backbone.spec.name})
    return {"backbone_weights": {"source": "finetuned", "file": BACKBONE_FILE, "sha256": None,  # set with the others
                                 "tensor_sha256": tensor_sha256(backbone.model), "base": backbone.weights.identity()}}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


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
    weights = _load_tensors(path, MODEL_FILE, config)
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    normalizer.load_state_dict({k[len("normalizer."):]: v for k, v in weights.items() if k.startswith("normalizer.")})
    return head.to(device).eval(), normalizer.to(device), spec


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's (or a run's ``last``) ``config.json``, its digest checked."""
    return read_json(_resolve(path) / CONFIG_FILE)


def _load_tensors(folder: Path, name: str, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
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
    backbone.model.load_state_dict(_load_tensors(path, BACKBONE_FILE, config))
    loaded = tensor_sha256(backbone.model)
    if loaded != record["tensor_sha256"]:
        raise DinocacheError(f"{path / BACKBONE_FILE} loads tensors with tensor_sha256 {loaded}, the checkpoint "
                             f"recorded {record['tensor_sha256']}")
    return record


def load_training_state(path: str | os.PathLike, head: nn.Module, optimizer: torch.optim.Optimizer,
                        backbone: nn.Module | None = None) -> dict[str, Any]:
    """Load weights into ``head`` (and a trained ``backbone``) and state into ``optimizer``; return the
    rest (step, rng per rank, sampler...).

    The returned ``rng`` is a list with one :func:`restore_rng`-ready entry per rank that saved it.
    """
    path = _resolve(path)
    config = read_config(path)
    weights = _load_tensors(path, MODEL_FILE, config)
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    if backbone is not None:
        load_backbone(path, backbone)
    tensors = _load_tensors(path, STATE_TENSORS, config)
    meta = read_json(path / STATE_JSON, config.get("files", {}))

    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        kind, first, *rest = key.split(".")
        if kind == "optimizer":
            state.setdefault(int(first), {})[rest[0]] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()}  # JSON made the tuple a list
              for group in meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})

    rng = []
    for rank, entry in enumerate(meta["rng"]):
        rng.append({"torch": tensors[f"rng.{rank}.torch"], "numpy": entry["numpy"], "python": entry["python"]})
        if entry["cuda_devices"]:
            rng[-1]["cuda"] = [tensors[f"rng.{rank}.cuda.{d}"] for d in range(entry["cuda_devices"])]
    meta["rng"] = rng
    meta["path"] = str(path)
    return meta
