"""Training on a dinocache feature store inside LeRobot's loop: features by the batch's frame ``index``.

With ``feature_cache`` set the frozen backbone is not run in training: LeRobot's dataloader still
yields its batches (state, action chunk, ``action_is_pad``, ``index``), and each frame's patch grid
(and CLS) is read from the store ``dinocache extract`` made of the same dataset, through
:class:`dinocache.policy.training.data.CachedFeatures` (held in memory when it fits, else read by chunk),
the reader ``dinocache train`` uses.

The store must be the one these features would have been computed from, or the head learns on
features it will never see on the robot. So before the first step the store is refused, in one
line naming the difference, when it was extracted from another dataset (its recorded fingerprint
is not the LeRobot dataset's), with another backbone or image size (name, model, preprocessing),
with other weights (the hash of the loaded tensors), or lacks a camera the policy reads; and a store
whose parts disagree (an edited root record, a shard file not written for its unit) is refused as
``dinocache train`` refuses it (:func:`~dinocache.policy.training.episodes.open_training_store` checks it whole). The
dataloader's frames are LeRobot's ``index``; the store's rows are its own (it may hold a subset of
the episodes): :class:`FeatureCache` maps one onto the other from both episode tables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinocache.encoders.backbone import FrozenBackbone
from dinocache.encoders.record import BackboneRecord
from dinocache.errors import DatasetError, StoreError
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.deployment.parity import feature_error
from dinocache.policy.model.config import ACTInputs
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import open_training_store

__all__ = ["FeatureCache", "backbone_differences", "WEIGHTS_SAFETY"]

#: A backbone passes when its features of the store's kept frames are within this many times the store's
#: expected rounding error of the cached ones (:func:`~dinocache.policy.deployment.parity.feature_error`).
WEIGHTS_SAFETY = 10.0


def backbone_differences(store: FeatureStore, encoder: FrozenBackbone) -> list[str]:
    """What differs between the backbone ``store`` was extracted with and ``encoder``: ``what: store X, policy Y``.

    Compared: the registry name, the fields that fix the model (:attr:`BackboneRecord.MODEL_FIELDS`)
    and the preprocessing (image size, crop, mean/std...); then, when those agree, the weights, by
    what they compute: ``encoder`` is run on the raw frames the store keeps and must give their
    cached features within the store's rounding (:func:`~dinocache.policy.deployment.parity.feature_error`,
    times :data:`WEIGHTS_SAFETY`). Other weights differ by about 100 %. (The recorded tensor hash
    cannot be compared after a policy is loaded from a pretrained folder: the hash is of the weights
    as loaded, before a ViT's position table is resized to the image size, and the folder holds the
    resized table.) Library versions are not compared.
    """
    recorded, built = store.record.backbone, encoder.record()
    diffs = [f"{key}: store {getattr(recorded, key)!r}, policy {getattr(built, key)!r}"
             for key in ("name", *BackboneRecord.MODEL_FIELDS)
             if getattr(recorded, key) is not None and getattr(recorded, key) != getattr(built, key)]
    for key in sorted(set(recorded.preprocess) | set(built.preprocess)):
        if recorded.preprocess.get(key) != built.preprocess.get(key):
            diffs.append(f"preprocess.{key}: store {recorded.preprocess.get(key)!r}, policy {built.preprocess.get(key)!r}")
    if diffs:
        return diffs
    weights = recorded.weights
    origin = f"random weights, seed {weights.seed}" if weights.is_random else f"weights {weights.path or weights.sha256}"
    kept = store.verification_frames()
    if kept is None:  # a store from before dinocache kept frames: the hash is all there is
        if weights.tensor_sha256 != encoder.weights.tensor_sha256:
            return [f"weights: store {origin} (tensor_sha256 {weights.tensor_sha256}), policy tensor_sha256 "
                    f"{encoder.weights.tensor_sha256}"]
        return []
    rows, frames = kept
    camera = store.cameras[0]
    cached = torch.from_numpy(store.patch(camera)[rows]).float().permute(0, 3, 1, 2)
    device = next(encoder.parameters()).device
    computed = encoder(torch.from_numpy(frames[camera]).to(device))[0].float().cpu()
    relative = float((computed - cached).norm() / cached.norm().clamp_min(1e-12))
    allowed = WEIGHTS_SAFETY * feature_error(store.record.dtype, store.record.precision, torch.float32)
    if not relative <= allowed:
        return [f"weights: the policy's backbone computes features {100 * relative:.3g} % away from the store's on "
                f"its {len(rows)} kept frames of {camera} (rounding allows {100 * allowed:.2g} %; the store was "
                f"extracted with {origin}, tensor_sha256 {weights.tensor_sha256})"]
    return []


class FeatureCache:
    """A feature store checked against the policy and the dataset; features of LeRobot frame indices.

    Args:
        path: The store (``dinocache extract DATASET --out path``).
        encoder: The policy's frozen backbone, whose features the store must hold.
        cameras: Head camera name -> the LeRobot image key it reads (``top`` -> ``observation.images.top``).
        use_cls_token: Also give each camera's CLS vector.
        dataset_meta: LeRobot's ``LeRobotDatasetMetadata`` of the training dataset: its ``root`` is
            checked against the store's recorded source, its episode table maps ``index`` to store rows.
        chunk_size: The head's chunk size (the reader's action windows; unused here but required by it).
        device: Where the features are gathered (held there when they fit).
    """

    def __init__(self, path: str | os.PathLike, encoder: FrozenBackbone, cameras: Mapping[str, str],
                 use_cls_token: bool, dataset_meta: Any, chunk_size: int, device: str | torch.device = "cpu") -> None:
        store = open_training_store(path)
        diffs = backbone_differences(store, encoder)
        if diffs:
            raise StoreError(f"feature_cache {store.path} was extracted with another backbone than the policy's "
                             f"({'; '.join(diffs)}): extract it with --backbone {encoder.spec.name} --image-size "
                             f"{'x'.join(map(str, encoder.preprocess.config.image_size))} and the same weights, "
                             "or drop feature_cache")
        missing = [key for key in cameras.values() if key not in store.cameras]
        if missing:
            raise StoreError(f"feature_cache {store.path} has no features of {', '.join(missing)} (it holds "
                             f"{', '.join(store.cameras)}): extract it with every camera the policy reads")
        self.store = store
        self._rows = _index_to_row(store, dataset_meta)
        self._data = CachedFeatures(store, chunk_size, use_cls_token, device=device)
        self._keys = [ACTInputs.feature_key(name) for name in cameras] + \
            ([ACTInputs.cls_key(name) for name in cameras] if use_cls_token else [])

    def features(self, index: Tensor) -> dict[str, Tensor]:
        """The head's feature keys for LeRobot frame ``index`` ``(B,)``: grids ``(B, C, h, w)`` and CLS ``(B, C)``,
        in the store's dtype, on the cache's device."""
        index_np = index.detach().cpu().numpy().astype(np.int64)
        outside = (index_np < 0) | (index_np >= len(self._rows))
        rows = np.where(outside, -1, self._rows[np.clip(index_np, 0, len(self._rows) - 1)])
        if (rows < 0).any():
            frame = int(index_np[np.flatnonzero(rows < 0)[0]])
            raise StoreError(f"feature_cache {self.store.path} has no features of dataset frame {frame} (it holds "
                             f"episodes {_episode_list(self.store)}): extract every episode that is trained on")
        block = self._data.resident
        if block is None:  # streamed: read the whole chunks these rows fall in
            block = self._data.load_chunks(np.unique(rows // self._data.chunk_frames))
        local = torch.from_numpy(block.local(rows))
        batch = {}
        for key in self._keys:
            table = block.tables[key]
            values = table.index_select(0, local.to(table.device))
            batch[key] = values.permute(0, 3, 1, 2) if values.dim() == 4 else values
        return batch


def _index_to_row(store: FeatureStore, dataset_meta: Any) -> np.ndarray:
    """Store row of each LeRobot frame ``index`` (-1 where the store lacks the frame), after checking that
    the store was extracted from this very dataset (the fingerprint dinocache recorded)."""
    if dataset_meta is None:
        raise StoreError(f"feature_cache {store.path}: the policy needs the training dataset's metadata to map frame "
                         "indices to store rows (make_policy(cfg, ds_meta=dataset.meta), as lerobot-train does)")
    try:
        store.open_source(dataset_meta.root)
    except DatasetError as err:  # another dataset (both fingerprints named), or one dinocache cannot read
        raise StoreError(f"feature_cache {store.path}: {err}") from None
    episodes = dataset_meta.episodes
    starts = dict(zip((int(e) for e in episodes["episode_index"]), (int(s) for s in episodes["dataset_from_index"])))
    ends = dict(zip((int(e) for e in episodes["episode_index"]), (int(s) for s in episodes["dataset_to_index"])))
    rows = np.full(int(dataset_meta.total_frames), -1, dtype=np.int64)
    for episode, start, length, _ in store.episodes():
        if episode not in starts or ends[episode] - starts[episode] != length:
            found = f"{ends[episode] - starts[episode]} frames" if episode in starts else "no such episode"
            raise StoreError(f"feature_cache {store.path}: episode {episode} has {length} frames in the store, "
                             f"{found} in the dataset {dataset_meta.root}")
        rows[starts[episode]:starts[episode] + length] = np.arange(start, start + length)
    return rows


def _episode_list(store: FeatureStore) -> str:
    indices = [episode for episode, *_ in store.episodes()]
    shown = ", ".join(map(str, indices[:10]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 10 else "")
