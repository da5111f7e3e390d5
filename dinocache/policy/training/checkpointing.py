"""Writing a run's checkpoints, and reading one back whole to resume: weights, optimiser, RNG, sampler.

The layout is :mod:`dinocache.policy.model.checkpoint`'s (what stage three reads too); this module is
the part only training needs: a checkpoint assembled in a hidden folder and renamed into place,
``last``/``best`` pointed at it, and every process's random state, so that a resumed run draws
exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from dinocache.encoders.weights import tensor_sha256
from dinocache.policy.model.checkpoint import (
    BACKBONE_FILE, BEST, CONFIG_FILE, LAST, MODEL_FILE, STATE_JSON, STATE_TENSORS, PolicySpec, checkpoint_dir,
    load_backbone, load_tensors, read_config, resolve_checkpoint,
)
from dinocache.policy.model.integrity import file_record, read_json, write_json
from dinocache.policy.model.normalize import Normalizer

__all__ = ["save_checkpoint", "load_training_state", "keep_fused", "capture_rng", "restore_rng"]


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

    A trained ``backbone`` (a :class:`~dinocache.policy.model.trainable.TrainableBackbone`) is saved whole
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


def load_training_state(path: str | os.PathLike, head: nn.Module, optimizer: torch.optim.Optimizer,
                        backbone: nn.Module | None = None) -> dict[str, Any]:
    """Load weights into ``head`` (and a trained ``backbone``) and state into ``optimizer``; return the
    rest (step, rng per rank, sampler...).

    The returned ``rng`` is a list with one :func:`restore_rng`-ready entry per rank that saved it.
    """
    path = resolve_checkpoint(path)
    config = read_config(path)
    weights = load_tensors(path, MODEL_FILE, config)
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    if backbone is not None:
        load_backbone(path, backbone)
    tensors = load_tensors(path, STATE_TENSORS, config)
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


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """Undo what loading a checkpoint does to the optimiser's flags: the saved param groups replace its
    own, so a checkpoint of an earlier, unfused run (step counts on the CPU) would unfuse it, and one of
    a graph run would leave it ``capturable``."""
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None, capturable=False)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device, torch.float32)
