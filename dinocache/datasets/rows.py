"""The raw frames of feature-store rows, decoded from the source dataset.

A feature store lays the episodes it holds end to end, one row per frame, and records each as
``(episode index, first row, length, ...)``. Checking a store against its backbone (at extraction),
exporting with a parity check and drawing inspect's PCA picture need the very frames a few rows
were computed from, once (:func:`frames_at_rows`); training with the backbone in the step needs the
frames of every batch's rows, again and again (:class:`EpisodeFrames`, which keeps decoded episodes).
This is the one place that maps rows back to episode frames and decodes them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dinocache.datasets.base import DatasetSource, reading_episode

__all__ = ["DECODE_THREADS", "EpisodeFrames", "frames_at_rows"]

#: Threads decoding the episodes of a batch.
DECODE_THREADS = 4
#: ``(episode index, first store row, length, ...)`` per stored episode, in row order.
Episodes = Sequence[tuple[Any, ...]]


def _episode_positions(episodes: Episodes, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows``, the position in ``episodes`` of the episode holding it."""
    starts = np.array([start for _, start, *_ in episodes], dtype=np.int64)
    return np.searchsorted(starts, np.asarray(rows, dtype=np.int64), side="right") - 1


def frames_at_rows(source: DatasetSource, episodes: Episodes, cameras: Sequence[str],
                   rows: np.ndarray) -> dict[str, np.ndarray]:
    """The raw uint8 frames of store ``rows``, per camera.

    Each episode holding a wanted row is decoded once per camera, from its start up to its last
    wanted frame: the frames are the very ones extraction feeds the backbone. A frame found bad on
    the way is an :class:`~dinocache.errors.EpisodeError`.
    """
    wanted: dict[int, list[tuple[int, int]]] = {}  # episode -> [(position in rows, frame in episode)]
    for position, (at, row) in enumerate(zip(_episode_positions(episodes, rows), rows)):
        index, start, *_ = episodes[at]
        wanted.setdefault(index, []).append((position, int(row) - start))
    out = {}
    for camera in cameras:
        info = source.cameras[camera]
        frames = np.empty((len(rows), info.height, info.width, 3), dtype=np.uint8)
        for index, targets in wanted.items():
            last, seen = max(frame for _, frame in targets), 0
            with reading_episode(index, camera):
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


class EpisodeFrames:
    """uint8 frames of store rows, decoded from ``source`` whole episode by whole episode, LRU-cached.

    ``cameras`` are dataset keys. A decoded episode is kept while the cache holds at most ``cache_bytes``
    (least recently used out first). Thread-safe: a batch thread and its decode pool share it.
    """

    def __init__(self, source: DatasetSource, episodes: Episodes, cameras: Sequence[str], cache_bytes: int,
                 threads: int = DECODE_THREADS) -> None:
        self.source, self.cameras, self.cache_bytes = source, list(cameras), cache_bytes
        self._episodes = [(int(index), int(start)) for index, start, *_ in episodes]
        self._cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.threads = threads

    def _episode(self, index: int, camera: str) -> np.ndarray:
        key = (index, camera)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        frames = self.source.read_frames(index, camera)
        with self._lock:
            if frames.nbytes <= self.cache_bytes and key not in self._cache:
                self._cache[key] = frames
                self._cached_bytes += frames.nbytes
                while self._cached_bytes > self.cache_bytes:
                    self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return frames

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Camera key -> uint8 ``(len(rows), H, W, 3)``; the episodes needed are decoded in parallel."""
        located = [self._episodes[p] for p in _episode_positions(self._episodes, rows)]
        needed = sorted({(index, camera) for index, _ in located for camera in self.cameras})
        with ThreadPoolExecutor(min(self.threads, len(needed)), thread_name_prefix="dinocache-decode") as pool:
            decoded = dict(zip(needed, pool.map(lambda key: self._episode(*key), needed)))
        return {camera: np.stack([decoded[index, camera][row - start] for (index, start), row in zip(located, rows)])
                for camera in self.cameras}
