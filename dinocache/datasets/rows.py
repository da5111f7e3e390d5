"""The raw frames of feature-store rows, decoded from the source dataset.

A feature store lays the episodes it holds end to end, one row per frame, and records each as
``(episode index, first row, length)``. Checking a store against its backbone (at extraction),
exporting with a parity check and drawing inspect's PCA picture all need the very frames some rows
were computed from; this is the one place that maps rows back to episode frames and decodes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinocache.datasets.base import DatasetSource

__all__ = ["frames_at_rows"]


def frames_at_rows(source: DatasetSource, episodes: Sequence[tuple[int, int, int]], cameras: Sequence[str],
                   rows: np.ndarray) -> dict[str, np.ndarray]:
    """The raw uint8 frames of store ``rows`` (``(index, start, length)`` per stored episode), per camera.

    Each episode holding a wanted row is decoded once per camera, from its start up to its last
    wanted frame: the frames are the very ones extraction feeds the backbone.
    """
    wanted: dict[int, list[tuple[int, int]]] = {}  # episode -> [(position in rows, frame in episode)]
    for position, row in enumerate(int(r) for r in rows):
        index, start, _ = next(ep for ep in episodes if ep[1] <= row < ep[1] + ep[2])
        wanted.setdefault(index, []).append((position, row - start))
    out = {}
    for camera in cameras:
        info = source.cameras[camera]
        frames = np.empty((len(rows), info.height, info.width, 3), dtype=np.uint8)
        for index, targets in wanted.items():
            last, seen = max(frame for _, frame in targets), 0
            batches = source.iter_frames(index, camera, batch_size=16)
            for batch in batches:
                for position, frame in targets:
                    if seen <= frame < seen + len(batch):
                        frames[position] = batch[frame - seen]
                seen += len(batch)
                if seen > last:  # stop decoding (a generator's close() releases the video now)
                    getattr(batches, "close", lambda: None)()
                    break
        out[camera] = frames
    return out
