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
* :class:`~dinocache.policy.model.trainable.TrainableBackbone`: the same backbone, trained at its own
  learning rate ``optimizer_lr_backbone``. For ACT's own backbone, torchvision's ImageNet ResNet18
  (timm ``resnet18.tv_in1k``) up to ``layer4``, every BatchNorm becomes ``FrozenBatchNorm2d``:
  LeRobot's ACT recipe, where every convolution trains (the original ACT code also froze ``conv1``
  and ``layer1``). For a DINO ViT it is ``dinocache finetune``'s backbone, with partial unfreezing,
  gradient checkpointing and layer-wise learning-rate decay for the memory and the stability a big
  one needs.

Either way a camera's grid ``(B, C, h, w)`` enters the head exactly like a cached grid (its 1x1
input projection maps the ``C`` channels, 512 for ResNet18). Frames arrive as uint8 ``(B, H, W, 3)``
under ``observation.images.<camera>`` (the head's camera names); state and actions already
normalised, as :class:`~dinocache.policy.training.frames.DecodedFrames` provides them (the training loop of
``dinocache train --online`` and ``dinocache finetune``, :mod:`dinocache.policy.training.finetune`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.encoders.preprocess import ImageSize
from dinocache.keys import CAMERA_PREFIX, camera_key
from dinocache.policy.model.act import ACTHead, act_optimizer
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.model.features import camera_features
from dinocache.policy.model.trainable import TrainableBackbone

__all__ = ["OnlineACT", "build_online_act"]


class OnlineACT(nn.Module):
    """An :class:`ACTHead` fed by a backbone that runs on every batch; ``forward`` is the training loss.

    ``forward(batch)`` (also :meth:`compute_loss`) returns what :meth:`ACTHead.compute_loss` returns for
    the same batch with cached features: ``batch`` holds ``observation.images.<camera>`` for every
    camera instead of ``features.<camera>`` / ``cls.<camera>``. Being ``forward``, DDP can wrap it.
    """

    def __init__(self, head: ACTHead, encoder: FrozenBackbone) -> None:
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
        fused live policy (:func:`~dinocache.policy.model.features.camera_features`)."""
        names = self.head.inputs.camera_names
        return camera_features(self.encoder, [batch[camera_key(name)] for name in names], names,
                               self.head.config.use_cls_token)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        lowdim = {key: value for key, value in batch.items() if not key.startswith(CAMERA_PREFIX)}
        return self.head.compute_loss({**lowdim, **self.features(batch)})

    compute_loss = forward

    def parameter_groups(self, layer_decay: float | None = None) -> list[dict]:
        """LeRobot ACT's optimiser groups: the head at ``optimizer_lr``, the backbone at ``optimizer_lr_backbone``.

        With ``layer_decay`` D (a :class:`TrainableBackbone`), a backbone parameter at depth ``l`` of
        ``L`` trains at ``optimizer_lr_backbone * D ** (L - l)`` (BEiT's layer-wise decay): the last
        block at the full rate, earlier ones, whose general features the head relies on, ever slower.
        """
        groups: list[dict] = [{"params": [p for p in self.head.parameters() if p.requires_grad]}]
        lr = self.head.config.optimizer_lr_backbone
        trained = [(name, p) for name, p in self.encoder.model.named_parameters() if p.requires_grad]
        if not trained:
            return groups
        if layer_decay is None:
            return [*groups, {"params": [p for _, p in trained], "lr": lr}]
        layers, depth = self.encoder.layers(), self.encoder.depth
        for layer in sorted({layers[name] for name, _ in trained}):
            groups.append({"params": [p for name, p in trained if layers[name] == layer],
                           "lr": lr * layer_decay ** (depth - layer)})
        return groups

    def optimizer(self, layer_decay: float | None = None) -> torch.optim.AdamW:
        """The cached training's AdamW (fused, :func:`~dinocache.policy.model.act.act_optimizer`) over
        :meth:`parameter_groups`: the baseline gets the same optimiser kernels as the cache."""
        return act_optimizer(self.parameter_groups(layer_decay), self.head.config)


def build_online_act(config: ACTConfig, backbone: str, cameras: Sequence[str], state_dim: int, action_dim: int,
                     env_state_dim: int | None = None, *, finetune: bool = False,
                     weights: str | os.PathLike[str] = "auto", image_size: ImageSize | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                     center_crop: bool = False) -> OnlineACT:
    """A fresh head behind the registered ``backbone``: frozen, or trained (``finetune``, a :class:`TrainableBackbone`).

    ``amp_dtype`` is the frozen backbone's autocast precision (as extraction's ``--precision``); a
    fine-tuned trunk follows the caller's autocast, as the head does. ``center_crop`` is extraction's
    ``--center-crop``.
    """
    frozen = create_backbone(backbone, weights=weights, image_size=image_size, center_crop=center_crop, seed=seed,
                             device=device, amp_dtype=None if finetune else amp_dtype)
    encoder = TrainableBackbone(frozen) if finetune else frozen
    inputs = ACTInputs(cameras=[(name, encoder.embed_dim, *encoder.grid_size) for name in cameras],
                       state_dim=state_dim, action_dim=action_dim, env_state_dim=env_state_dim)
    return OnlineACT(ACTHead(config, inputs), encoder).to(device)
