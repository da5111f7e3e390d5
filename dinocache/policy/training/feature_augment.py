"""Augmentation at train time on cached features: a store's views, and shifts and dropout of the patch grid.

A cache freezes each frame's pixels; two kinds of augmentation survive it, and neither costs the
cache anything at train time:

* **Views** (a store extracted with ``--views K``): every training sample uses one of its frame's K
  stored views, drawn uniformly (``--view-sampling uniform``) or always the clean one (``clean``,
  for comparison: only view 0 is then loaded). The draw (:class:`ViewDraw`) is a pure function of
  the run's seed, the process's rank and the sample's position in the process's stream, like the
  sampler's order, so a resumed run draws what the uninterrupted one did. Validation always uses
  view 0, the frame the live policy sees.
* **Feature-grid augmentation** (:class:`FeatureAugment`), DrQ's random shift and patch dropout moved
  from pixels to the patch grid: each camera's grid is shifted by up to ``--grid-shift`` whole
  patches in each direction with its edge patches replicated (:func:`shift_grid`, as DrQ pads by
  replication and crops), and each patch is zeroed with probability ``--patch-dropout``. It runs
  inside the training step on the device (in its CUDA graph, on the device's generator, whose state
  checkpoints keep), in training mode only: validation and the exported policy see the grid as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from dinocache.keys import FEATURES_PREFIX
from dinocache.pipeline.store import FeatureStore

__all__ = ["loaded_views", "ViewDraw", "shift_grid", "FeatureAugment"]


def loaded_views(store: FeatureStore, sampling: str) -> int:
    """How many views of every frame training holds and draws from: all of the store's (``--view-sampling
    uniform``), or one (``clean``)."""
    return store.views if sampling == "uniform" else 1


class ViewDraw:
    """The view of each sample of one process's training stream, from ``position`` on.

    Sample ``p`` of rank ``rank`` uses view ``draws[p]``, where the draws are uniform over ``views``,
    made in blocks of :attr:`BLOCK` by ``numpy.random.default_rng((seed, rank, block, salt))``: a pure
    function of those, as the sampler's order is of ``(seed, epoch)``. Batches are cut from the stream
    in order, so a batch's views do not depend on when it was gathered (ahead, on another thread), and
    a run resumed at ``position`` draws exactly what the uninterrupted run drew from there.
    """

    BLOCK = 4096
    _SALT = 0x76696577  # "view": keeps these draws apart from the sampler's, seeded by (seed, epoch, ...)

    def __init__(self, views: int, seed: int, rank: int = 0, position: int = 0) -> None:
        self.views, self.seed, self.rank, self.position = views, seed, rank, position
        self._cached: tuple[int, np.ndarray] | None = None

    def _block(self, block: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != block:
            rng = np.random.default_rng((self.seed, self.rank, block, self._SALT))
            self._cached = (block, rng.integers(0, self.views, self.BLOCK, dtype=np.int64))
        return self._cached[1]

    def take(self, count: int) -> np.ndarray:
        """The views of the next ``count`` samples (int64)."""
        parts = []
        while count > 0:
            block, offset = divmod(self.position, self.BLOCK)
            part = self._block(block)[offset:offset + count]
            parts.append(part)
            self.position += len(part)
            count -= len(part)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def shift_grid(grid: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Every patch grid of a batch ``(B, C, h, w)`` shifted by whole patches, edges replicated.

    ``out[b, :, y, x] = grid[b, :, clamp(y + dy[b], 0, h-1), clamp(x + dx[b], 0, w-1)]``: the content
    moves by ``(-dy[b], -dx[b])`` patches and the cells it uncovers repeat the nearest edge patch,
    which is what padding by replication and cropping at offset ``(pad + dy, pad + dx)`` gives (DrQ's
    random shift, on pixels). One gather, on the batch's channels-last layout; the result has it too.
    """
    b, c, h, w = grid.shape
    rows = (torch.arange(h, device=grid.device) + dy.view(b, 1)).clamp(0, h - 1)
    cols = (torch.arange(w, device=grid.device) + dx.view(b, 1)).clamp(0, w - 1)
    index = (rows.view(b, h, 1) * w + cols.view(b, 1, w)).view(b, h * w, 1).expand(b, h * w, c)
    tokens = grid.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return tokens.gather(1, index).view(b, h, w, c).permute(0, 3, 1, 2)


class FeatureAugment(nn.Module):
    """Random grid shift and patch dropout of every camera's ``features.<camera>`` in a batch, in
    training mode; the identity in eval mode (validation) and when both are off.

    Each camera of each sample gets its own shift, ``dy, dx`` uniform in ``[-grid_shift, grid_shift]``
    patches, and its own dropout mask, each patch zeroed with probability ``patch_dropout`` (not
    rescaled: a zeroed patch stands for a patch that shows nothing, as in masked-token training).
    CLS tokens are left as they are: they describe the whole frame.
    """

    def __init__(self, grid_shift: int = 0, patch_dropout: float = 0.0) -> None:
        super().__init__()
        self.grid_shift, self.patch_dropout = int(grid_shift), float(patch_dropout)

    def extra_repr(self) -> str:
        return f"grid_shift={self.grid_shift}, patch_dropout={self.patch_dropout}"

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.training or (self.grid_shift == 0 and self.patch_dropout == 0.0):
            return batch
        out = dict(batch)
        for key, grid in batch.items():
            if not key.startswith(FEATURES_PREFIX):
                continue
            b, _, h, w = grid.shape
            if self.grid_shift:
                dy, dx = torch.randint(-self.grid_shift, self.grid_shift + 1, (2, b), device=grid.device)
                grid = shift_grid(grid, dy, dx)
            if self.patch_dropout:
                keep = torch.rand((b, 1, h, w), device=grid.device) >= self.patch_dropout
                grid = grid * keep.to(grid.dtype)
            out[key] = grid
        return out
