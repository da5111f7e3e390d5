"""ACT with the image backbone inside every training step: the baseline the cache is measured against.

dinocache trains the ACT head on features computed once, at extraction. Showing that this pays,
and training a genuine ACT to compare policies with, both need the usual way too: camera frames in
every batch, the backbone run on every step. This module is that and nothing more. It reuses the
project's own pieces (the registry's backbones and weights loading, the one
:class:`~dinocache.encoders.ImagePreprocessor`, the very same :class:`ACTHead` and its loss), so
the only difference from cached training is where the feature grids come from.

Two encoders:

* :class:`~dinocache.encoders.FrozenBackbone` (DINOv2/v3 or any registered backbone), run without
  grad in eval mode on every step: how LeRobot trains an ACT whose vision backbone is a frozen DINO.
  Its grids are exactly the cached ones, so the loss is the cached loss.
* :class:`FinetunedConvNet`: ACT's own backbone, torchvision's ImageNet ResNet18 (timm
  ``resnet18.tv_in1k``) up to ``layer4``, every BatchNorm replaced by torchvision's
  ``FrozenBatchNorm2d`` and trained at its own learning rate ``optimizer_lr_backbone``: LeRobot's
  ACT recipe, where every convolution trains (the original ACT code also froze ``conv1`` and
  ``layer1``).

Either way a camera's grid ``(B, C, h, w)`` enters the head exactly like a cached grid (its 1x1
input projection maps the ``C`` channels, 512 for ResNet18). Frames arrive as uint8 ``(B, H, W, 3)``
under ``observation.images.<camera>`` (the head's camera names); state and actions already
normalised, as :class:`~dinocache.policy.data.CachedFeatures` provides them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.encoders.preprocess import ImageSize
from dinocache.errors import BackboneError
from dinocache.keys import CAMERA_PREFIX, camera_key
from dinocache.policy.act import ACTHead, act_optimizer
from dinocache.policy.config import ACTConfig, ACTInputs
from dinocache.policy.fused import camera_features

__all__ = ["FinetunedConvNet", "OnlineACT", "build_online_act"]


class FinetunedConvNet(nn.Module):
    """A convnet trunk that trains, as ACT trains its ResNet18: uint8 frames in, ``(grid, pooled)`` out.

    Built from a :class:`FrozenBackbone` so that the weights and the preprocessing come from the one
    place that loads and checks them; its BatchNorm layers become ``FrozenBatchNorm2d`` (statistics and
    affine parameters fixed, as in ACT/DETR) and every other parameter requires grad again.
    """

    def __init__(self, backbone: FrozenBackbone) -> None:
        super().__init__()
        if backbone.spec.kind != "convnet":
            raise BackboneError(f"{backbone.spec.name} is a {backbone.spec.kind}: fine-tuning online is ACT's "
                                f"recipe for its ResNet; run ViTs frozen")
        self.spec = backbone.spec
        self.preprocess = backbone.preprocess
        self.model = freeze_batch_norm_2d(backbone.model).requires_grad_(True)
        self.grid_size = backbone.grid_size
        self.embed_dim = backbone.embed_dim

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(self.preprocess(images))
        return features, features.mean(dim=(2, 3))


class OnlineACT(nn.Module):
    """An :class:`ACTHead` fed by a backbone that runs on every batch; ``forward`` is the training loss.

    ``forward(batch)`` (also :meth:`compute_loss`) returns what :meth:`ACTHead.compute_loss` returns for
    the same batch with cached features: ``batch`` holds ``observation.images.<camera>`` for every
    camera instead of ``features.<camera>`` / ``cls.<camera>``. Being ``forward``, DDP can wrap it.
    """

    def __init__(self, head: ACTHead, encoder: FrozenBackbone | FinetunedConvNet) -> None:
        super().__init__()
        grid = (encoder.embed_dim, *encoder.grid_size)
        for name, *shape in head.inputs.cameras:
            if tuple(shape) != grid:
                raise ValueError(f"camera {name!r}: the head expects grids {tuple(shape)}, "
                                 f"{encoder.spec.name} gives {grid}")
        self.head = head
        self.encoder = encoder

    @property
    def trains_backbone(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every camera's grid (and CLS, with ``use_cls_token``) under the head's batch keys, as in the
        fused live policy (:func:`~dinocache.policy.fused.camera_features`)."""
        names = self.head.inputs.camera_names
        return camera_features(self.encoder, [batch[camera_key(name)] for name in names], names,
                               self.head.config.use_cls_token)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        lowdim = {key: value for key, value in batch.items() if not key.startswith(CAMERA_PREFIX)}
        return self.head.compute_loss({**lowdim, **self.features(batch)})

    compute_loss = forward

    def parameter_groups(self) -> list[dict]:
        """LeRobot ACT's optimiser groups: the head at ``optimizer_lr``, the backbone at ``optimizer_lr_backbone``."""
        groups: list[dict] = [{"params": [p for p in self.head.parameters() if p.requires_grad]}]
        backbone = [p for p in self.encoder.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": self.head.config.optimizer_lr_backbone})
        return groups

    def optimizer(self) -> torch.optim.AdamW:
        """The cached training's AdamW (fused, :func:`~dinocache.policy.act.act_optimizer`) over
        :meth:`parameter_groups`: the baseline gets the same optimiser kernels as the cache."""
        return act_optimizer(self.parameter_groups(), self.head.config)


def build_online_act(config: ACTConfig, backbone: str, cameras: Sequence[str], state_dim: int, action_dim: int,
                     env_state_dim: int | None = None, *, finetune: bool = False,
                     weights: str | os.PathLike[str] = "auto", image_size: ImageSize | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None) -> OnlineACT:
    """A fresh head behind the registered ``backbone``: frozen, or fine-tuned the ACT way (``finetune``).

    ``amp_dtype`` is the frozen backbone's autocast precision (as extraction's ``--precision``); a
    fine-tuned trunk follows the caller's autocast, as the head does.
    """
    frozen = create_backbone(backbone, weights=weights, image_size=image_size, seed=seed, device=device,
                             amp_dtype=None if finetune else amp_dtype)
    encoder = FinetunedConvNet(frozen) if finetune else frozen
    inputs = ACTInputs(cameras=[(name, encoder.embed_dim, *encoder.grid_size) for name in cameras],
                       state_dim=state_dim, action_dim=action_dim, env_state_dim=env_state_dim)
    return OnlineACT(ACTHead(config, inputs), encoder).to(device)
