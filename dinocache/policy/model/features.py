"""The head's camera inputs from frames: one function that training online and the live policy share.

A head trained on cached features reads each camera's grid (and CLS) under
:meth:`~dinocache.policy.model.config.ACTInputs.feature_key`; anything that computes them from frames
(the fused live policy, ``train --online``, ``finetune``, the parity check) goes through
:func:`camera_features`, so they are laid out the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dinocache.policy.model.config import ACTInputs

__all__ = ["camera_features"]


def camera_features(encoder: Callable[[Tensor], tuple[Tensor, Tensor]], images: list[Tensor],
                    camera_names: Sequence[str], use_cls_token: bool) -> dict[str, Tensor]:
    """Each camera's grid (and CLS, with ``use_cls_token``) under the head's batch keys.

    ``encoder`` maps uint8 ``(B, H, W, 3)`` frames to ``(grid, cls)``: the frozen backbone here and
    in the online baseline, or ACT's fine-tuned ResNet there. Cameras of one size go through it as
    one batch (one call, better use of a GPU); shapes are static, so under ``torch.export`` the
    choice is made once, at trace time.
    """
    if len(images) > 1 and all(image.shape == images[0].shape for image in images):
        grid, cls = encoder(torch.cat(images))
        n = len(images)  # camera-major rows: unflatten, not split, keeps the batch size symbolic
        outputs = list(zip(grid.unflatten(0, (n, -1)).unbind(0), cls.unflatten(0, (n, -1)).unbind(0)))
    else:
        outputs = [encoder(image) for image in images]
    batch: dict[str, Tensor] = {}
    for name, (grid, cls) in zip(camera_names, outputs):
        batch[ACTInputs.feature_key(name)] = grid
        if use_cls_token:
            batch[ACTInputs.cls_key(name)] = cls
    return batch
