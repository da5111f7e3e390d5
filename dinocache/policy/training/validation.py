"""Validation on held-out episodes, and the score of learning nothing it is judged against.

Both in normalised action units over the non-padded steps of each chunk, as the head's L1 loss is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dinocache.policy.model.config import ACTION, ACTION_IS_PAD
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import action_windows
from dinocache.policy.training.frames import DecodedFrames
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.step import Replayed, autocast

__all__ = ["Validation", "mean_action_l1"]


def mean_action_l1(data: CachedFeatures, train_rows: np.ndarray, val_rows: np.ndarray) -> float:
    """Validation L1 of always predicting the training set's mean action: what "learning nothing" scores.

    Measured like the head's L1: normalised actions, over the non-padded steps of each chunk.
    """
    action = data.lowdim[ACTION]
    mean = action.index_select(0, torch.from_numpy(train_rows)).mean(0)
    windows, is_pad = action_windows(torch.from_numpy(val_rows), data.episode_end, data.chunk_size)
    return (action[windows] - mean).abs()[~is_pad].mean().item()


class Validation:
    """Validation L1 (normalised action units, non-padded steps) with the zero latent the live policy uses.

    Batches of one size (the last padded, its padding masked) into fixed buffers, so that the forward
    can be a CUDA graph like the training step; L1 and the count of real elements are summed on the
    device and read once, at the end. Under DDP each process takes every ``world_size``-th frame.
    """

    def __init__(self, model: nn.Module, data: CachedFeatures | DecodedFrames, rows: np.ndarray, batch_size: int,
                 procs: Processes, graph: bool) -> None:
        self.model, self.data, self.procs = model, data, procs
        self.rows = rows[procs.rank::procs.world_size]
        self.inputs = data.batch_buffers(max(1, min(batch_size, len(self.rows))), procs.device)
        self.sums = torch.zeros(2, device=procs.device)
        self.autocast = autocast(procs.device)
        self._run = Replayed(self._forward, graph)

    @torch.no_grad()
    def _forward(self) -> None:
        with self.autocast:
            _, info = self.model(self.inputs)
        count = (~self.inputs[ACTION_IS_PAD]).sum() * self.inputs[ACTION].shape[-1]
        self.sums.add_(torch.stack([info["l1_loss"].float() * count, count.float()]))

    def __call__(self) -> float:
        self.model.eval()
        for _ in self.data.validation_batches(self.rows, self.inputs):
            self._run()
        self.model.train()
        total, count = self.procs.sum(self.sums.tolist())
        self.sums.zero_()
        return total / max(count, 1.0)
