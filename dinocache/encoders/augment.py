"""Augmented views of camera frames: a recipe's transforms applied to decoded uint8 frames, per frame.

Extraction with ``--views K`` runs the backbone on every frame K times: view 0 is the frame as it is
(the very batch a K=1 extraction runs, so its features are bit-identical), views 1..K-1 are the frame
through :func:`augment_frame`, applied on the extraction device to the decoded uint8 frame *before*
the one preprocessing module, exactly where LeRobot's ``image_transforms`` act on a training frame.
The maths is torchvision's (``transforms.v2.functional``); which transforms a view gets and their
parameters are drawn as LeRobot draws them (:mod:`dinocache.encoders.augment_recipe`).

Every draw comes from a generator seeded by ``(recipe seed, store row, view, camera)`` alone
(:func:`frame_seed`), never by a running random state: a frame's views do not depend on the batch it
was in, the shard or process that computed it, or a kill and a rerun, which is what keeps a store's
bytes reproducible. Parameters are drawn on the CPU, so they are the same whatever the device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dinocache.encoders.augment_recipe import AugmentRecipe

__all__ = ["frame_seed", "draw_transforms", "augment_frame", "ViewAugmenter"]

_COLOUR = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
           "hue": TF.adjust_hue, "sharpness": TF.adjust_sharpness}


def frame_seed(seed: int, row: int, view: int, camera: str) -> int:
    """The seed of one view of one camera's frame: a digest of the four, so neighbouring rows or views
    get unrelated draws."""
    digest = hashlib.sha256(f"dinocache-view:{seed}:{row}:{view}:{camera}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in ``[low, high]``, both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _parameters(name: str, params: Mapping[str, Any], generator: torch.Generator, height: int,
                width: int) -> dict[str, Any]:
    """One transform's random parameters for a ``height`` x ``width`` frame (torchvision's ``make_params``)."""
    if name in _COLOUR:
        return {"factor": _uniform(generator, *params["range"])}
    if name == "rotation":
        return {"angle": _uniform(generator, *params["degrees"])}
    if name == "affine":  # as v2.RandomAffine: a whole number of pixels, up to the fraction of each side
        max_x, max_y = params["translate"][0] * width, params["translate"][1] * height
        return {"angle": _uniform(generator, *params["degrees"]),
                "translate": [round(_uniform(generator, -max_x, max_x)), round(_uniform(generator, -max_y, max_y))]}
    if name == "crop":  # a crop of the frame's aspect ratio covering `scale` of its area, scaled back up
        side = math.sqrt(_uniform(generator, *params["scale"]))
        crop_h, crop_w = max(1, round(height * side)), max(1, round(width * side))
        return {"top": _integer(generator, 0, height - crop_h), "left": _integer(generator, 0, width - crop_w),
                "height": crop_h, "width": crop_w}
    if name == "shift":  # DrQ: pad by replicating the edges, crop back at a random offset
        pad_x, pad_y = round(params["max"] * width), round(params["max"] * height)
        return {"pad": [pad_x, pad_y], "dx": _integer(generator, -pad_x, pad_x), "dy": _integer(generator, -pad_y, pad_y)}
    raise ValueError(f"unknown transform {name!r}")  # a recipe names only known transforms (augment_recipe)


def draw_transforms(recipe: AugmentRecipe, generator: torch.Generator, height: int,
                    width: int) -> list[tuple[str, dict[str, Any]]]:
    """The transforms one view of a frame gets, with their parameters, in the order they apply.

    As LeRobot's ``RandomSubsetApply``: ``max_num_transforms`` of them drawn by weight without
    replacement (``torch.multinomial``), in the recipe's order unless ``random_order``.
    """
    names = list(recipe.transforms)
    weights = torch.tensor([recipe.transforms[name]["weight"] for name in names], dtype=torch.float64)
    count = min(recipe.max_num_transforms, int((weights > 0).sum()))
    chosen = torch.multinomial(weights, count, replacement=False, generator=generator)
    if not recipe.random_order:
        chosen = chosen.sort().values
    return [(names[i], _parameters(names[i], recipe.transforms[names[i]], generator, height, width))
            for i in chosen.tolist()]


def _apply(name: str, image: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """One transform on a ``(3, H, W)`` uint8 image, with torchvision's defaults for what the recipe
    does not set (nearest-neighbour and black fill for rotations, as ``RandomAffine`` and
    ``RandomRotation``; antialiased bilinear for the crop's rescale, as ``RandomResizedCrop``)."""
    height, width = image.shape[-2:]
    if name in _COLOUR:
        return _COLOUR[name](image, p["factor"])
    if name == "rotation":
        return TF.rotate(image, p["angle"], interpolation=InterpolationMode.NEAREST, fill=0)
    if name == "affine":
        return TF.affine(image, angle=p["angle"], translate=p["translate"], scale=1.0, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.NEAREST, fill=0)
    if name == "crop":
        return TF.resized_crop(image, p["top"], p["left"], p["height"], p["width"], [height, width],
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
    pad_x, pad_y = p["pad"]
    padded = TF.pad(image, [pad_x, pad_y, pad_x, pad_y], padding_mode="edge")
    return TF.crop(padded, pad_y + p["dy"], pad_x + p["dx"], height, width)


def augment_frame(image: torch.Tensor, recipe: AugmentRecipe, seed: int) -> torch.Tensor:
    """One view of one ``(3, H, W)`` uint8 frame: the recipe's transforms drawn from ``seed``
    (:func:`frame_seed`), applied where the frame is (the extraction device)."""
    generator = torch.Generator().manual_seed(seed)
    for name, params in draw_transforms(recipe, generator, *image.shape[-2:]):
        image = _apply(name, image, params)
    return image


class ViewAugmenter:
    """Views 1..K-1 of a batch of one camera's frames, for extraction with ``views`` = K > 1."""

    def __init__(self, recipe: AugmentRecipe, views: int) -> None:
        self.recipe, self.views = recipe, views

    def __call__(self, images: torch.Tensor, camera: str, rows: Sequence[int]) -> list[torch.Tensor]:
        """``images`` ``(B, H, W, 3)`` uint8, the frames of store ``rows``: a ``(B, H, W, 3)`` batch per
        augmented view, on the same device (channels-last views of channels-first frames: the
        preprocessing reads either)."""
        chw = images.permute(0, 3, 1, 2)
        return [torch.stack([augment_frame(frame, self.recipe, frame_seed(self.recipe.seed, int(row), view, camera))
                             for frame, row in zip(chw, rows)]).permute(0, 2, 3, 1)
                for view in range(1, self.views)]
