"""Rebuild, for stage three, the very backbone a feature store was extracted with, and prove it.

A head is only as good as the features it is fed. The store records what produced them (registry
name, timm id, preprocessing, and the weights: file sha256, seed of random ones, and a hash of the
loaded tensors); this module rebuilds the backbone from that record and refuses, before anything is
exported, a backbone that is not the one: other weights (the file hash or the tensor hash differs),
another model or another preprocessing. Whatever slips through (a different timm version computing
differently) is caught numerically by the parity check in :mod:`dinocache.policy.deployment.parity`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.preprocess import PreprocessConfig
from dinocache.encoders.record import BackboneRecord, WeightsRecord
from dinocache.encoders.weights import find_local_weights
from dinocache.errors import BackboneError

__all__ = ["default_weights", "rebuild_backbone", "check_weights"]


def default_weights(record: BackboneRecord) -> str:
    """What to load when the user names no weights: the seeded random initialisation the store
    recorded; else the recorded file if it is still there; else a copy on this machine
    (``$DINOCACHE_WEIGHTS``, the Hugging Face cache); else ``auto`` (a download, or one message
    saying which file to get). Whatever is found is then checked against the recorded hashes."""
    if record.weights.is_random:
        return "random"
    path = record.weights.path
    if path and Path(path).exists():
        return str(path)
    local = find_local_weights(get_backbone_spec(record.name))
    return str(local) if local is not None else "auto"


def rebuild_backbone(record: BackboneRecord, weights: str | os.PathLike[str] | None = None,
                     device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                     check: bool = True) -> FrozenBackbone:
    """The backbone of ``record``, with ``weights`` (default :func:`default_weights`).

    With ``check`` (the default), weights whose file sha256 or tensor hash differ from the recorded
    ones are refused (:func:`check_weights`). A different model or preprocessing is always refused.
    """
    preprocess = record.preprocess_config()
    chosen = default_weights(record) if weights is None else weights
    backbone = create_backbone(record.name, weights=chosen, image_size=preprocess.image_size,
                               center_crop=preprocess.center_crop, seed=int(record.weights.seed or 0),
                               device=device, amp_dtype=amp_dtype)
    _check_same_model(backbone, record, preprocess)
    if check:
        check_weights(backbone.weights, record.weights, chosen)
    return backbone


def _check_same_model(backbone: FrozenBackbone, recorded: BackboneRecord, preprocess: PreprocessConfig) -> None:
    built = backbone.record()
    diffs = [f"{key}: store has {getattr(recorded, key)!r}, this dinocache builds {getattr(built, key)!r}"
             for key in BackboneRecord.MODEL_FIELDS
             if getattr(recorded, key) is not None and getattr(recorded, key) != getattr(built, key)]
    if backbone.preprocess.config != preprocess:
        diffs.append(f"preprocess: store has {preprocess.to_dict()}, this dinocache builds "
                     f"{backbone.preprocess.config.to_dict()}")
    if diffs:
        raise BackboneError(f"backbone {recorded.name} is no longer built the way the feature store's was "
                            f"({'; '.join(diffs)}); export with the dinocache version that extracted it")


def check_weights(loaded: WeightsRecord, recorded: WeightsRecord, requested: Any) -> None:
    """Refuse weights that are not the ones the store was extracted with, showing both hashes.

    Both the file's sha256 and the hash of the loaded tensors must agree: the first names the file,
    the second also covers random initialisations (which have no file, so only their tensor hashes
    are compared) and would catch a loader that changed what it does with the same file.
    """
    what = "random weights" if loaded.is_random else f"weights file {loaded.path}"
    if recorded.is_random:
        origin = f"random weights (seed {recorded.seed})"
    else:
        origin = f"the weights file {recorded.path or '(path not recorded)'}"
    fix = ("pass --weights PATH to the file the store was extracted with" if not recorded.is_random
           else "drop --weights: the store's random weights are rebuilt from their recorded seed")
    if not recorded.is_random and loaded.sha256 != recorded.sha256:
        raise BackboneError(
            f"{what} (requested as {str(requested)!r}) has sha256 {loaded.sha256} but the feature store "
            f"was extracted with {origin}, sha256 {recorded.sha256}; {fix}")
    if loaded.tensor_sha256 != recorded.tensor_sha256:
        raise BackboneError(
            f"{what} (requested as {str(requested)!r}) loads tensors with tensor_sha256 {loaded.tensor_sha256} "
            f"but the feature store was extracted with {origin}, tensor_sha256 {recorded.tensor_sha256}; {fix}")
