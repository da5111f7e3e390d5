"""The order a rank visits the training frames in: a pure function of ``(seed, epoch, rank, world_size)``.

The order of an epoch is drawn from ``numpy.random.default_rng((seed, epoch))``, and the whole state
of the sampler is the number of samples one rank has consumed. A checkpoint stores that number, and
a resumed run regenerates exactly the batches the uninterrupted run would have seen. Under DDP each
rank takes its own disjoint share of every epoch (every ``world_size``-th frame, or window of chunks
when features are streamed: a window of whole chunks is read at once and its frames shuffled
together, a shuffle buffer drawn from random places in the store).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dinocache.errors import DinocacheError

__all__ = ["SampleOrder"]


@dataclass(frozen=True)
class SampleOrder:
    """The order in which one rank visits the training frames: a pure function of the epoch.

    Args:
        rows: The training rows of the store (sorted).
        seed: Seed of every epoch's permutation.
        rank, world_size: This process's share of each epoch (disjoint across ranks).
        chunk_frames: None to shuffle single frames (features in memory). Otherwise the store's chunk
            size: each epoch permutes the chunks, cuts them into windows of ``window_chunks``, deals
            the windows out to the ranks and shuffles the frames inside each window.
        window_chunks: Chunks per streaming window.
    """

    rows: np.ndarray
    seed: int
    rank: int = 0
    world_size: int = 1
    chunk_frames: int | None = None
    window_chunks: int = 1

    def __post_init__(self) -> None:
        if len(self.rows) == 0:
            raise DinocacheError("no training frames to sample from")
        if self.chunk_frames is None:
            if len(self.rows) < self.world_size:
                raise DinocacheError(f"{len(self.rows)} training frames cannot be shared by "
                                     f"{self.world_size} processes")
        elif self.num_windows < self.world_size:
            raise DinocacheError(
                f"{len(self.chunks)} training chunks make {self.num_windows} streaming windows, fewer than the "
                f"{self.world_size} processes; lower the window size or the number of processes"
            )

    @property
    def chunks(self) -> np.ndarray:
        """Store chunks holding training frames (sorted)."""
        return np.unique(self.rows // self.chunk_frames)

    @property
    def num_windows(self) -> int:
        return math.ceil(len(self.chunks) / self.window_chunks)

    def epoch(self, epoch: int) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """This rank's pieces of ``epoch``: ``(chunks to load or None, rows in visiting order)``."""
        rng = np.random.default_rng((self.seed, epoch))
        if self.chunk_frames is None:
            return [(None, rng.permutation(self.rows)[self.rank::self.world_size])]
        chunk_of_row = self.rows // self.chunk_frames
        chunks = np.unique(chunk_of_row)
        lo = np.searchsorted(chunk_of_row, chunks, side="left")
        hi = np.searchsorted(chunk_of_row, chunks, side="right")
        order = rng.permutation(len(chunks))
        pieces = []
        for w in range(self.rank, self.num_windows, self.world_size):
            members = np.sort(order[w * self.window_chunks:(w + 1) * self.window_chunks])
            rows = np.concatenate([self.rows[lo[c]:hi[c]] for c in members])
            pieces.append((chunks[members], np.random.default_rng((self.seed, epoch, 1 + w)).permutation(rows)))
        return pieces

    def pieces(self, position: int = 0) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """The endless stream of pieces, starting after the first ``position`` samples of this rank."""
        epoch = 0
        if self.chunk_frames is None:  # every epoch has the same length: skip whole ones without drawing them
            epoch, position = divmod(position, len(range(self.rank, len(self.rows), self.world_size)))
        while True:
            for chunks, rows in self.epoch(epoch):
                if position >= len(rows):
                    position -= len(rows)
                    continue
                yield chunks, rows[position:]
                position = 0
            epoch += 1
