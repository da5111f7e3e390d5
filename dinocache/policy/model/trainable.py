"""A backbone that trains: ACT's fine-tuned ResNet18, or a DINO ViT fine-tuned from its cached warm start.

:class:`TrainableBackbone` is what ``dinocache train --online`` and ``dinocache finetune`` train
(:mod:`dinocache.policy.training.finetune`); :class:`BackboneTraining` records how (in ``run.json`` and every
checkpoint, under ``backbone_training``); :func:`load_trained_backbone` rebuilds a checkpoint's
trained backbone for export: the base weights rebuilt and checked against the hashes recorded when
training started, made trainable the same way, then the saved tensors loaded (their own sha256
checked, :func:`~dinocache.policy.model.checkpoint.load_backbone`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import group_parameters
from torch import Tensor, nn

from dinocache.encoders.backbone import FrozenBackbone
from dinocache.encoders.record import WeightsRecord
from dinocache.errors import BackboneError, TrainingError
from dinocache.policy.model.checkpoint import PolicySpec, load_backbone, resolve_checkpoint
from dinocache.policy.model.provenance import rebuild_backbone

__all__ = ["TrainableBackbone", "BackboneTraining", "load_trained_backbone"]


class TrainableBackbone(FrozenBackbone):
    """A registered backbone that trains: uint8 frames in, ``(grid, cls)`` out, gradients flowing.

    Built from a :class:`FrozenBackbone` (the one place that loads and checks weights and builds the
    preprocessing), so it computes exactly what the frozen one, the cache's, computes until its first
    update. Convnets get ACT's recipe: every BatchNorm becomes ``FrozenBatchNorm2d`` (statistics and
    affine parameters fixed, as in ACT/DETR), every convolution trains. Memory options for big ViTs:

    * ``unfreeze_last``: train only the last K blocks (with the final norm); the stem and the other
      blocks stay frozen and keep no gradients or optimiser moments (timm's parameter groups, from
      ``group_matcher``, define the blocks: a ViT's transformer blocks, a ResNet's residual blocks);
    * ``gradient_checkpointing``: recompute each block's activations in the backward pass instead of
      keeping them (timm's ``set_grad_checkpointing``): about a third more compute, activations of one
      block instead of all.

    :meth:`layers` numbers the parameters by depth for layer-wise learning-rate decay.
    """

    def __init__(self, backbone: FrozenBackbone, unfreeze_last: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        model = freeze_batch_norm_2d(backbone.model) if backbone.spec.kind == "convnet" else backbone.model
        super().__init__(backbone.spec, model, backbone.preprocess, backbone.weights)
        layers = self.layers()
        self.depth = max(layers.values())
        if unfreeze_last is not None and not 0 < unfreeze_last <= self.depth:
            raise BackboneError(f"--unfreeze-last {unfreeze_last}: {self.spec.name} has {self.depth} blocks "
                                f"after its stem; choose 1 to {self.depth}")
        first = 0 if unfreeze_last is None else self.depth - unfreeze_last + 1
        for name, param in self.model.named_parameters():
            param.requires_grad_(layers[name] >= first)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.train()

    def train(self, mode: bool = True) -> TrainableBackbone:
        """Follow the parent's mode (a frozen backbone refuses to leave eval mode; this one trains)."""
        return nn.Module.train(self, mode)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        grid, cls = self._encode(self.preprocess(images))
        return grid.float(), cls.float()

    def layers(self) -> dict[str, int]:
        """Parameter name (in ``model``) -> depth: 0 for the stem, 1 .. :attr:`depth` for the blocks (timm's
        fine ``group_matcher``; the final norm goes with the last block)."""
        return group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)

    def frozen(self, amp_dtype: torch.dtype | None = None) -> FrozenBackbone:
        """The same modules as a :class:`FrozenBackbone` (no grad from now on, eval mode, autocast to
        ``amp_dtype``): what the live policy runs."""
        return FrozenBackbone(self.spec, self.model, self.preprocess, self.weights, amp_dtype)


@dataclass(frozen=True)
class BackboneTraining:
    """How the backbone trains (``--optimizer-lr-backbone``, ``--unfreeze-last``, ``--layer-decay``,
    ``--gradient-checkpointing``): ``lr`` overrides the head config's ``optimizer_lr_backbone`` (None
    keeps it). See :class:`TrainableBackbone` and ``docs/training.md`` for what each option saves."""

    lr: float | None = None
    unfreeze_last: int | None = None
    layer_decay: float | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise TrainingError(f"--optimizer-lr-backbone {self.lr}: must be positive")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise TrainingError(f"--layer-decay {self.layer_decay}: must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encoder(self, backbone: FrozenBackbone) -> TrainableBackbone:
        """``backbone`` made trainable as asked."""
        return TrainableBackbone(backbone, self.unfreeze_last, self.gradient_checkpointing)


def load_trained_backbone(checkpoint: str | os.PathLike, spec: PolicySpec, weights: str | os.PathLike | None = None,
                          device: str | torch.device = "cpu", check: bool = True) -> TrainableBackbone:
    """The trained backbone of a checkpoint (or a run's ``last``) whose spec is ``spec``; its ``weights``
    record is the trained tensors' (``source`` ``finetuned``, their hashes, and the ``base`` weights').

    ``weights`` and ``check`` are :func:`~dinocache.policy.model.provenance.rebuild_backbone`'s: base weights
    that are not the recorded ones are refused with both hashes before anything is loaded.
    """
    base = rebuild_backbone(spec.store_record.backbone, weights=weights, device=device, check=check)
    encoder = BackboneTraining(**spec.backbone_training).encoder(base)
    encoder.weights = WeightsRecord.from_dict(load_backbone(resolve_checkpoint(checkpoint), encoder))
    return encoder.eval()
