"""The export's self-check: on real frames, the fused policy must act as the head does on the cache.

The head was trained on cached features; the fused policy recomputes them from pixels. If anything
between the two differs (weights, preprocessing, frame decoding, a timm upgrade), the robot runs a
policy that was never validated. So before a file is written, for a few frames spread over the
store (:func:`~dinocache.pipeline.store.verification_rows`), the fused policy's actions on the raw
frames and raw state are compared with the head's actions on the *cached* features and the same
state. The raw frames come from the source dataset when it is there (and still the same: its
fingerprint is checked), else from the few frames the store keeps for this purpose.

Tolerance. The two sides legitimately differ by the rounding of the cached features (float16 by
default: relative error up to 2^-11), by any half-precision compute at extraction
(``--precision``) or in the fused policy (``--dtype``), and by float32 kernel noise. How much that
moves the actions depends on the head, so it is measured: the head is run on the cached features
with Gaussian noise of that relative size added (:func:`feature_error`, relative to each token's RMS),
plus, under a half ``--dtype``, the change from running the head itself in that dtype; the tolerance
is :data:`SAFETY` times the largest action change these cause. Differences are in
normalised action units (action standard deviations, so every action dimension counts alike).
Features from other weights differ by ~100 %, hundreds of times more than any rounding, and fail.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinocache.datasets import open_dataset
from dinocache.datasets.rows import frames_at_rows
from dinocache.encoders.backbone import FrozenBackbone
from dinocache.errors import DatasetError, DinocacheError
from dinocache.keys import ACTION, CLS_PREFIX, FEATURES_PREFIX, OBS_ENV_STATE, OBS_STATE
from dinocache.pipeline.store import FeatureStore, verification_rows
from dinocache.policy.deployment.fused import FusedPolicy
from dinocache.policy.model.config import ACTInputs
from dinocache.policy.model.features import camera_features

__all__ = ["ParityError", "ParityReport", "VerificationFrames", "feature_error", "open_run_store",
           "verification_frames", "check_parity", "check_trained_parity", "check_run", "rounding_tolerance",
           "ROUNDING", "COMPUTE_FACTOR", "SAFETY"]

#: Relative error of one rounding to each dtype (its unit roundoff). For float32 it stands for the
#: run-to-run noise of float32 kernels instead (batch size and thread count change summation orders).
ROUNDING = {"float32": 1e-5, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: A backbone computing under half-precision autocast rounds at every layer; its final features are
#: off by a few unit roundoffs (bfloat16 ViTs: cosine similarity ~0.9999 to float32, i.e. ~1.4 %).
COMPUTE_FACTOR = 4
#: Allowed difference = SAFETY x the action change caused by feature noise of the expected size.
SAFETY = 4.0
#: Floor of the tolerance (normalised action units), for a head that barely reads its features.
MIN_TOLERANCE = 1e-6
_PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ParityError(DinocacheError):
    """The fused policy does not reproduce the head's actions on the cached features."""


@dataclass
class VerificationFrames:
    """Raw frames of some store rows: one uint8 ``(K, H, W, 3)`` array per camera, in store order."""

    rows: np.ndarray
    images: list[np.ndarray]
    origin: str  # "dataset <path>" or "store"


@dataclass
class ParityReport:
    """What the check measured (differences and tolerance in normalised action units)."""

    frames: int
    rows: list[int]
    origin: str
    max_abs_diff: float
    max_abs_diff_raw: float
    tolerance: float
    sensitivity: float
    feature_error: float
    feature_rel_diff: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"verified": True, **asdict(self)}

    def format(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"parity {verdict}: max |fused - head on cache| = {self.max_abs_diff:.3g} action std "
                f"({self.max_abs_diff_raw:.3g} in action units), tolerance {self.tolerance:.3g}, over "
                f"{self.frames} frames from the {self.origin}; features differ by {100 * self.feature_rel_diff:.3g} %")


def feature_error(store_dtype: str, extraction_precision: str, compute_dtype: torch.dtype) -> float:
    """Expected relative error of the fused policy's features against the cached ones (see module doc)."""
    error = ROUNDING[store_dtype]
    for dtype in (_PRECISION_DTYPES.get(extraction_precision, "float32"), str(compute_dtype).removeprefix("torch.")):
        if dtype != "float32":
            error += COMPUTE_FACTOR * ROUNDING[dtype]
    return error


def open_run_store(policy: FusedPolicy, store: str | os.PathLike | None = None) -> FeatureStore:
    """The feature store the head was trained on (``store`` overrides the recorded path), checked to be it."""
    path = Path(store) if store is not None else Path(policy.spec.store_path)
    if not path.exists():
        raise DinocacheError(f"the feature store the head was trained on, {path}, is not there: the export check "
                             "needs its cached features; pass --store PATH (or --skip-verify to export unverified)")
    opened = FeatureStore(path)
    opened.check_identity(policy.spec.store_record.identity(), hint="it is not the store the head was trained on")
    opened.check_whole()
    return opened


def verification_frames(store: FeatureStore, dataset: str | os.PathLike | None = None) -> VerificationFrames:
    """Raw frames for the check: from ``dataset`` (default: the store's recorded source path) when it
    is there, else from the frames the store keeps. A ``dataset`` given explicitly must be the one the
    store was extracted from (same fingerprint)."""
    try:
        source = store.open_source(dataset)
    except DatasetError as err:
        if dataset is not None:  # asked for by name: no quiet fallback
            raise
        why = str(err)
    else:
        rows = verification_rows(store.num_frames)
        episodes = [(index, start, length) for index, start, length, _ in store.episodes()]
        frames = frames_at_rows(source, episodes, store.cameras, rows)
        return VerificationFrames(rows, [frames[camera] for camera in store.cameras], f"dataset {source.path}")
    kept = store.verification_frames()
    if kept is None:
        raise DinocacheError(f"cannot check the exported policy: {why}, and the store {store.path} keeps no raw "
                             "frames (it predates them); pass --dataset PATH, or --skip-verify to export unverified")
    rows, frames = kept
    return VerificationFrames(rows, [frames[camera] for camera in store.cameras], "store's kept frames")


def _cached_batch(policy: FusedPolicy, store: FeatureStore, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
    """The head's batch for store ``rows``: cached features and normalised state, as in training."""
    batch: dict[str, Tensor] = {}
    for name, camera in zip(policy.inputs.camera_names, policy.cameras):
        grids = np.stack([store.patch(camera, slice(r, r + 1))[0] for r in rows])
        batch[ACTInputs.feature_key(name)] = torch.from_numpy(grids).float().permute(0, 3, 1, 2).to(device)
        if policy.spec.config.use_cls_token:
            cls = np.stack([store.cls(camera, slice(r, r + 1))[0] for r in rows])
            batch[ACTInputs.cls_key(name)] = torch.from_numpy(cls).float().to(device)
    for key in (OBS_STATE, OBS_ENV_STATE) if policy.has_env_state else (OBS_STATE,):
        batch[key] = policy.normalizer.normalize(key, _lowdim(store, key, rows, device))
    return batch


def _lowdim(store: FeatureStore, key: str, rows: np.ndarray, device: torch.device) -> Tensor:
    values = store.read(key)
    return torch.from_numpy(np.asarray(values[rows], dtype=np.float32).reshape(len(rows), -1)).to(device)


def _with_noise(batch: dict[str, Tensor], relative: float) -> dict[str, Tensor]:
    """``batch`` with Gaussian noise of ``relative`` x each token's RMS added to every feature (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    noisy = dict(batch)
    for key, value in batch.items():
        if key.startswith((FEATURES_PREFIX, CLS_PREFIX)):
            rms = value.pow(2).mean(dim=1, keepdim=True).sqrt()  # channels are dim 1 for grids and CLS
            noise = torch.randn(value.shape, generator=generator).to(value.device)
            noisy[key] = value + relative * rms * noise
    return noisy


@torch.no_grad()
def check_parity(policy: FusedPolicy, store: FeatureStore, frames: VerificationFrames) -> ParityReport:
    """Compare the fused policy on ``frames`` with the head on the same rows' cached features."""
    device = next(policy.parameters()).device
    state = _lowdim(store, OBS_STATE, frames.rows, device)
    env = _lowdim(store, OBS_ENV_STATE, frames.rows, device) if policy.has_env_state else None
    error = feature_error(store.record.dtype, store.record.precision, policy.compute_dtype)
    return _compare(policy, frames, state, env, _cached_batch(policy, store, frames.rows, device), error)


@torch.no_grad()
def check_trained_parity(policy: FusedPolicy, frames: VerificationFrames, state: Tensor,
                         env: Tensor | None = None) -> ParityReport:
    """Compare the fused policy on ``frames`` with the eager policy of a run that trained its backbone.

    Its features are no longer the cached ones, so the reference is the trained policy run eagerly
    as it was trained: its backbone in float32 (the trained tensors, loaded and hash-checked), then
    the head, on the same frames and raw ``state`` / ``env``.
    """
    device = next(policy.parameters()).device
    state = state.to(device)
    env = env.to(device) if env is not None else None
    backbone = policy.backbone
    eager = FrozenBackbone(backbone.spec, backbone.model, backbone.preprocess, backbone.weights)  # float32
    images = [torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in frames.images]
    batch = camera_features(eager, images, policy.inputs.camera_names, policy.spec.config.use_cls_token)
    batch[OBS_STATE] = policy.normalizer.normalize(OBS_STATE, state)
    if env is not None:
        batch[OBS_ENV_STATE] = policy.normalizer.normalize(OBS_ENV_STATE, env)
    return _compare(policy, frames, state, env, batch, feature_error("float32", "fp32", policy.compute_dtype))


def _compare(policy: FusedPolicy, frames: VerificationFrames, state: Tensor, env: Tensor | None,
             batch: dict[str, Tensor], error: float) -> ParityReport:
    """The fused policy on ``frames`` against the head on ``batch`` (reference features and normalised
    state), with the tolerance measured for a relative feature ``error`` (see the module docstring)."""
    device = next(policy.parameters()).device
    images = [torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in frames.images]
    fused = policy(images, state, env)
    reference = policy.head(batch)[0].float()  # the head as trained: float32, on the reference features
    diff = (policy.normalizer.normalize(ACTION, fused) - reference).abs().max().item()
    diff_raw = (fused - policy.normalizer.unnormalize(ACTION, reference)).abs().max().item()
    sensitivity = _sensitivity(policy, batch, reference, error)
    tolerance = max(SAFETY * sensitivity, MIN_TOLERANCE)

    expected = batch[ACTInputs.feature_key(policy.inputs.camera_names[0])]
    recomputed = policy.backbone(images[0])[0].float()
    rel = ((recomputed - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    return ParityReport(frames=len(frames.rows), rows=[int(r) for r in frames.rows], origin=frames.origin,
                        max_abs_diff=diff, max_abs_diff_raw=diff_raw, tolerance=tolerance, sensitivity=sensitivity,
                        feature_error=error, feature_rel_diff=rel, passed=bool(diff <= tolerance))


def _sensitivity(policy: FusedPolicy, batch: dict[str, Tensor], reference: Tensor, error: float) -> float:
    """How far the head's actions (``reference`` on ``batch``) move when the features carry relative
    noise ``error`` and, under a half ``--dtype``, when the head itself computes in that dtype."""
    sensitivity = (policy.head(_with_noise(batch, error))[0].float() - reference).abs().max().item()
    if policy.compute_dtype != torch.float32:
        with torch.autocast(reference.device.type, dtype=policy.compute_dtype):
            sensitivity += (policy.head(batch)[0].float() - reference).abs().max().item()
    return sensitivity


@torch.no_grad()
def rounding_tolerance(policy: FusedPolicy, images: list[Tensor], state: Tensor, env: Tensor | None = None) -> float:
    """The tolerance :func:`check_parity` would measure, on inputs that have no reference to compare with.

    An export whose check was skipped (``--skip-verify``) still compares the file it writes with the
    eager policy; at half precision the two round differently (an ONNX graph computes in its dtype
    where autocast keeps float32), and this is the scale that rounding may move the actions by.
    """
    grids = camera_features(policy.backbone, images, policy.inputs.camera_names, policy.spec.config.use_cls_token)
    batch = {key: value.float() for key, value in grids.items()}
    batch[OBS_STATE] = policy.normalizer.normalize(OBS_STATE, state)
    if env is not None:
        batch[OBS_ENV_STATE] = policy.normalizer.normalize(OBS_ENV_STATE, env)
    reference = policy.head(batch)[0].float()
    error = feature_error("float32", "fp32", policy.compute_dtype)
    return max(SAFETY * _sensitivity(policy, batch, reference, error), MIN_TOLERANCE)


def check_run(policy: FusedPolicy, store: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None
              ) -> tuple[ParityReport, VerificationFrames, Tensor, Tensor | None]:
    """The export's check for any run: the report, the frames it used and their raw state (and env state).

    A cached run is checked against its cache (:func:`check_parity`); a run that trained its
    backbone against its eager policy (:func:`check_trained_parity`), on frames of its store (as for
    a cached run) or, for an online run, which has none, of its dataset (``dataset``, else the
    recorded path; same fingerprint).
    """
    if policy.spec.store_path is None:
        frames, state, env = _dataset_frames(policy, dataset)
        return check_trained_parity(policy, frames, state, env), frames, state, env
    feature_store = open_run_store(policy, store)
    frames = verification_frames(feature_store, dataset)
    state = _lowdim(feature_store, OBS_STATE, frames.rows, torch.device("cpu"))
    env = _lowdim(feature_store, OBS_ENV_STATE, frames.rows, torch.device("cpu")) if policy.has_env_state else None
    if policy.spec.backbone_training is None:
        return check_parity(policy, feature_store, frames), frames, state, env
    return check_trained_parity(policy, frames, state, env), frames, state, env


def _dataset_frames(policy: FusedPolicy,
                    dataset: str | os.PathLike | None) -> tuple[VerificationFrames, Tensor, Tensor | None]:
    """Frames and raw state of :func:`verification_rows` of an online run's dataset (checked to be it)."""
    record = policy.spec.store_record
    path = Path(dataset) if dataset is not None else Path(record.source_path or "")
    if not path.exists():
        raise DinocacheError(f"cannot check the exported policy: its dataset {path} is not there; pass --dataset PATH, "
                             "or --skip-verify to export unverified")
    source = open_dataset(path)
    if source.fingerprint() != record.source.fingerprint:
        raise DatasetError(f"{path} is not the dataset the run was trained on (fingerprint "
                           f"{source.fingerprint()}, the run has {record.source.fingerprint})")
    cameras = source.select_cameras(policy.cameras)
    rows = verification_rows(sum(episode.length for episode in source.episodes))
    images = frames_at_rows(source, [(ep.index, ep.start, ep.length) for ep in source.episodes], cameras, rows)
    keys = [OBS_STATE, OBS_ENV_STATE] if policy.has_env_state else [OBS_STATE]
    lowdim = {key: [] for key in keys}
    for episode in source.episodes:
        arrays = source.read_lowdim(episode.index)
        for key in keys:
            lowdim[key].append(np.asarray(arrays[key], np.float32).reshape(episode.length, -1))
    raw = {key: torch.from_numpy(np.concatenate(parts)[rows]) for key, parts in lowdim.items()}
    return (VerificationFrames(rows, [images[camera] for camera in cameras], f"dataset {path}"),
            raw[OBS_STATE], raw.get(OBS_ENV_STATE))
