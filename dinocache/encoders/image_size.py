"""Image sizes as users write them (``224``, ``"224x320"``) and the rule every backbone input obeys.

Torch-free and next to the registry, so that the command line and the table of backbones can read
``--image-size`` without importing the preprocessing module (and torch with it).
"""

from __future__ import annotations

import math
import re

from dinocache.errors import BackboneError

ImageSize = int | str | tuple[int, int] | list[int]


def parse_image_size(value: ImageSize) -> tuple[int, int]:
    """``224`` / ``"224"`` / ``"224x320"`` / ``(224, 320)`` -> ``(height, width)``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", value)
        if not match:
            raise BackboneError(f"image size {value!r} is not N or HxW (e.g. 224 or 224x320)")
        height = int(match.group(1))
        width = int(match.group(2)) if match.group(2) else height
    elif isinstance(value, bool):
        raise BackboneError(f"image size {value!r} is not N or HxW")
    elif isinstance(value, int):
        height = width = value
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        height, width = int(value[0]), int(value[1])
    else:
        raise BackboneError(f"image size {value!r} is not N or HxW (e.g. 224 or 224x320)")
    if height <= 0 or width <= 0:
        raise BackboneError(f"image size {height}x{width} must be positive")
    return height, width


def _nearest_multiples(value: int, step: int) -> str:
    below, above = (value // step) * step, math.ceil(value / step) * step
    return f"{below} or {above}" if below > 0 else str(above)


def check_image_size(size: tuple[int, int], patch_size: int, backbone: str | None = None) -> None:
    """Refuse a size the patch size does not divide, naming the nearest valid sizes.

    A non-multiple would silently drop the right/bottom pixels (ViT patchify) or make the grid
    depend on padding arithmetic (convnets); both make caches incomparable across backbones.
    """
    of = f" of {backbone}" if backbone else ""
    for axis, value in zip(("height ", "width "), size):
        if value % patch_size:
            label = str(value) if size[0] == size[1] else f"image size {size[0]}x{size[1]}: {axis}{value}"
            raise BackboneError(
                f"{label} is not a multiple of the patch size {patch_size}{of}; "
                f"nearest valid sizes: {_nearest_multiples(value, patch_size)}"
            )
