"""Resize a ViT's absolute position table the way the upstream code does.

DINOv2 is pretrained with a 37x37 table (518 px at patch 14). At any other resolution the table is
bicubically resampled, and the official models do it in two different ways
(facebookresearch/dinov2 ``hub/backbones.py``):

* without registers: ``interpolate_offset=0.1``, ``interpolate_antialias=False``; the grid is
  resized with ``scale_factor=(n + 0.1) / 37``, which torch uses as given for the sampling
  positions (so they are not the ``37 / n`` of a size-based resize);
* with registers: ``interpolate_offset=0``, ``interpolate_antialias=True``, a plain size-based
  antialiased resize, which is exactly timm's ``resample_abs_pos_embed``.

timm resamples every model the second way, so timm's DINOv2 *without* registers drifts from the
official features below 518 px (about 1.6 % of the feature magnitude at 224 px). dinocache resizes
the table once, at build time, with the official settings of each model (``BackboneSpec``
``pos_interp_offset`` / ``pos_interp_antialias``), so the exported graph holds a constant table and
matches the upstream features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    offset: float = 0.0,
    antialias: bool = True,
) -> torch.Tensor:
    """Bicubically resize a ``(1, prefix + h*w, C)`` table from ``old_grid`` to ``new_grid``.

    Prefix (CLS) entries are kept as they are. ``offset > 0`` reproduces DINOv2's historical
    ``scale_factor=(new + offset) / old`` call; ``offset == 0`` is a size-based resize.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((new_grid[0] + offset) / old_grid[0], (new_grid[1] + offset) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias)
    if tuple(grid.shape[-2:]) != tuple(new_grid):  # the upstream code asserts the same
        raise AssertionError(f"position table resized to {tuple(grid.shape[-2:])}, not {new_grid}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
