"""Decode all cameras of an episode in background threads while the caller uses the frames.

Extraction alternates "decode a batch" with "run the backbone on it". Run in one thread, the
two add up; here each camera's video is decoded by its own thread into a small bounded queue
(PyAV and Pillow release the GIL while decoding), so decoding overlaps both the other cameras
and the caller's GPU work, and memory stays bounded by ``queue_size`` batches per camera.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from dinocache.pipeline.readers.base import DatasetSource

_DONE = object()


def iter_episode_batches(source: DatasetSource, episode_index: int,
                         cameras: Sequence[str] | None = None, batch_size: int = 32,
                         queue_size: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{camera_key: uint8 (b, H, W, 3)}`` with aligned batches for every camera.

    All batches hold ``batch_size`` frames except the last. A decoding error in any camera is
    raised here, in the caller's thread. Closing the iterator early stops the threads.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = source.select_cameras(cameras)
    source.episode(episode_index)  # unknown / skipped episodes fail here, not in a thread
    stop = threading.Event()
    queues = {key: queue.Queue(maxsize=max(queue_size, 1)) for key in keys}
    threads = [threading.Thread(target=_decode_into, daemon=True,
                                name=f"dinocache-decode-{key}",
                                args=(source, episode_index, key, batch_size, queues[key], stop))
               for key in keys]
    for thread in threads:
        thread.start()
    try:
        while True:
            batch: dict[str, np.ndarray] = {}
            for key in keys:
                item = queues[key].get()
                if isinstance(item, BaseException):
                    raise item
                if item is not _DONE:
                    batch[key] = item
            if not batch:
                return
            if len(batch) != len(keys):  # cannot happen: every stream holds `length` frames
                raise RuntimeError(f"camera streams of episode {episode_index} ended unevenly")
            yield batch
    finally:
        stop.set()
        for key in keys:  # unblock producers waiting on a full queue
            while not queues[key].empty():
                queues[key].get_nowait()
        for thread in threads:
            thread.join(timeout=5)


def _decode_into(source: DatasetSource, episode_index: int, camera: str, batch_size: int,
                 out: queue.Queue, stop: threading.Event) -> None:
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        frames = source.iter_frames(episode_index, camera, batch_size=batch_size)
        for batch in rebatch(frames, batch_size):
            if not put(batch):
                return
        put(_DONE)
    except BaseException as err:  # handed to the consumer, which re-raises it
        put(err)


def rebatch(batches: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of frame batches of any sizes into batches of exactly ``batch_size``."""
    pending: list[np.ndarray] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(batch)
        while held >= batch_size:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
