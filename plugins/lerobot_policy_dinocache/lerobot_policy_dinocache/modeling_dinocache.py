"""``DinocachePolicy``: dinocache's ACT, in LeRobot's policy interface.

The network is not written again here. The policy holds dinocache's
:class:`~dinocache.policy.training.online.OnlineACT`: the very :class:`~dinocache.policy.model.act.ACTHead` that
``dinocache train`` trains on cached features, behind the registered backbone, frozen
(:class:`~dinocache.encoders.FrozenBackbone`, with the one preprocessing module extraction and the
exported policy run) or trained (:class:`~dinocache.policy.model.trainable.TrainableBackbone`). Action
selection is dinocache's :mod:`~dinocache.policy.model.action_selection` (LeRobot's queue and temporal
ensembling semantics). What this module adds is the translation between LeRobot's batches and the
head's:

* images arrive from LeRobot's dataloader and processors as float ``[0, 1]`` ``(B, C, H, W)``:
  LeRobot divides the decoded uint8 frames by 255, so ``(x * 255).round()`` gives back exactly the
  uint8 frames the backbone's preprocessing takes (the frames extraction fed it);
* state and actions arrive normalised by LeRobot's processors (mean/std from the dataset's stats),
  which is what the head reads and predicts;
* with ``feature_cache`` set, training looks the features up by the batch's ``index``
  (:mod:`.feature_cache`) instead of running the frozen backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinocache.errors import DinocacheError
from dinocache.keys import ACTION, ACTION_IS_PAD, OBS_ENV_STATE, OBS_STATE, camera_key, short_name
from dinocache.policy.model.action_selection import make_action_selector
from dinocache.policy.model.integrity import check_folder
from dinocache.policy.training.online import OnlineACT, build_online_act
from lerobot.policies.pretrained import PreTrainedPolicy

from .configuration_dinocache import POLICY_TYPE, DinocacheConfig
from .feature_cache import FeatureCache

__all__ = ["DinocachePolicy", "uint8_frames"]

#: The batch key of LeRobot's global frame index (what the feature cache is looked up by).
INDEX = "index"


def uint8_frames(images: Tensor) -> Tensor:
    """LeRobot's float ``[0, 1]`` frames as the uint8 frames they were decoded from.

    LeRobot turns a decoded uint8 value ``k`` into the float32 ``k / 255``; ``255 * (k / 255)`` is
    within a few ulps of ``k``, so rounding recovers ``k`` exactly and the backbone sees the very
    pixels extraction saw. (Frames changed by augmentation are rounded to the nearest level.)
    """
    if images.dtype == torch.uint8:
        return images
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _local_folder(name_or_path: str | Path, kwargs: dict[str, Any]) -> Path:
    """The folder ``from_pretrained`` loads: the path itself, or a Hub repository's snapshot, fetched
    with the options LeRobot's loading gets (revision, cache, token, offline...)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    options = ("revision", "cache_dir", "force_download", "proxies", "token", "local_files_only")
    return Path(snapshot_download(repo_id=str(name_or_path), **{k: kwargs[k] for k in options if k in kwargs}))


class DinocachePolicy(PreTrainedPolicy):
    """ACT on a dinocache backbone; ``lerobot-train`` / ``lerobot-eval`` / ``lerobot-rollout`` run it as any policy.

    Args:
        config: The policy's :class:`DinocacheConfig`.
        dataset_stats: What ``make_policy`` passes every policy; unused: the processors normalise.
        dataset_meta: LeRobot's metadata of the training dataset (``make_policy`` passes it); the
            feature cache maps frame indices through it.
        backbone_from_checkpoint: Build the backbone without loading ``pretrained_backbone_weights``,
            because its tensors are about to be loaded from a pretrained folder (:meth:`from_pretrained`).
    """

    config_class = DinocacheConfig
    name = POLICY_TYPE

    def __init__(self, config: DinocacheConfig, dataset_stats: Any = None, dataset_meta: Any = None, *,
                 backbone_from_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(config)
        config.validate_features()
        self.config = config
        #: Head camera name -> LeRobot image key, in the config's order (the head's token order).
        self.cameras = {short_name(key): key for key in config.image_features}
        if len(self.cameras) != len(config.image_features):
            raise ValueError(f"dinocache policy: the image keys {list(config.image_features)} must end in distinct "
                             "names (the head names each camera by the last part of its key)")
        self._lowdim_keys = [OBS_STATE] + ([OBS_ENV_STATE] if config.env_state_feature else [])
        env = config.env_state_feature
        try:
            self.model: OnlineACT = build_online_act(
                config.act_config(), config.vision_backbone, list(self.cameras),
                state_dim=config.robot_state_feature.shape[0], action_dim=config.action_feature.shape[0],
                env_state_dim=env.shape[0] if env else None, finetune=not config.freeze_backbone,
                weights="random" if backbone_from_checkpoint else config.pretrained_backbone_weights,
                image_size=config.image_hw, seed=config.backbone_seed, center_crop=config.center_crop)
        except DinocacheError as err:
            raise ValueError(f"dinocache policy: {err}") from None
        self._dataset_meta = dataset_meta
        self._cache: FeatureCache | None = None
        if config.feature_cache is not None and not backbone_from_checkpoint:
            self._feature_cache()  # refuse a store that does not fit before training starts
        self._selector = make_action_selector(self.model.head.config)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, **kwargs: Any) -> DinocachePolicy:
        """LeRobot's loading, the backbone's tensors taken from the folder's ``model.safetensors`` (not
        fetched again), and strictly: a tensor missing from the file is an error, not a random weight.

        A folder ``dinocache export --format lerobot`` wrote (local, or a Hub repository it was pushed
        to) is first checked against the digests its ``dinocache.json`` records of every file, the
        processors' included: a damaged file is refused naming it, before anything is loaded.
        """
        kwargs.setdefault("strict", True)
        check_folder(_local_folder(pretrained_name_or_path, kwargs))
        return super().from_pretrained(pretrained_name_or_path, backbone_from_checkpoint=True, **kwargs)

    def _feature_cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = FeatureCache(self.config.feature_cache, self.model.encoder, self.cameras,
                                       self.config.use_cls_token, self._dataset_meta, self.config.chunk_size,
                                       self.config.device or "cpu")
        return self._cache

    def get_optim_params(self) -> list[dict]:
        """The head at ``optimizer_lr``, a trained backbone at ``optimizer_lr_backbone`` (LeRobot ACT's groups)."""
        return self.model.parameter_groups()

    def reset(self) -> None:
        """Forget queued actions or the running ensemble (call at the start of every episode)."""
        self._selector.reset()

    def _camera_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The backbone run on the batch's frames: each camera's grid (and CLS) under the head's keys."""
        frames = {camera_key(name): uint8_frames(batch[key]) for name, key in self.cameras.items()}
        return self.model.features(frames)

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict[str, float]]:
        """ACT's loss on a LeRobot training batch (normalised state and action chunk, ``action_is_pad``).

        ``reduction="none"`` gives each sample's loss, ``(B,)``, for LeRobot's sample weighting. With
        ``feature_cache`` the features come from the store, looked up by ``batch["index"]``.
        """
        head_batch = {key: batch[key] for key in (*self._lowdim_keys, ACTION, ACTION_IS_PAD)}
        if self.config.feature_cache is not None:
            if INDEX not in batch:
                raise KeyError(f"dinocache policy: feature_cache looks features up by the batch's {INDEX!r}, which "
                               "LeRobotDataset gives and this batch lacks")
            device = batch[OBS_STATE].device
            cached = self._feature_cache().features(batch[INDEX])
            head_batch.update({key: value.to(device, non_blocking=True) for key, value in cached.items()})
        else:
            head_batch.update(self._camera_features(batch))
        loss, info = self.model.head.compute_loss(head_batch, reduction=reduction)
        return loss, {key: value.item() for key, value in info.items()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """A normalised action chunk ``(B, chunk_size, action_dim)`` for a (preprocessed) observation batch."""
        self.eval()
        head_batch = {key: batch[key] for key in self._lowdim_keys}
        head_batch.update(self._camera_features(batch))
        return self.model.head(head_batch)[0]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """One normalised action per row: from the queue of ``n_action_steps``, or temporally ensembled."""
        self.eval()
        return self._selector.select(lambda: self.predict_action_chunk(batch))
