"""Decoding in background threads, read back in order: the one threaded producer of the package.

A video can only be decoded front to back, so the way to use more cores is to decode several
streams at once. :class:`Prefetcher` runs one stream (any iterator) in a daemon thread into a
bounded queue; :func:`ordered_streams` keeps up to ``workers`` of them decoding at once and hands
their items back strictly in stream order, so whatever the caller computes is the same with one
worker or sixteen; :func:`iter_episode_batches` decodes all cameras of one episode side by side.

Threads, not processes: PyAV and Pillow release the GIL while they decode and convert, and a
thread hands its frames over without copying them between processes (measured in
``docs/benchmarks.md``). An error in a stream is raised in the caller's thread at the place it
happened in the stream, after every item before it, and closing the iterator stops the threads.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from dinocache.datasets.base import DatasetSource

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``make()`` in a daemon thread, at most ``queue_size`` items ahead of the reader.

    ``busy_s`` is the time the thread spent producing items (not waiting for room in the queue):
    the stream's own cost, which the extraction summary adds up per stage.
    """

    def __init__(self, make: Callable[[], Iterable[T]], queue_size: int = 2, name: str = "dinocache-prefetch") -> None:
        self.busy_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(queue_size, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name=name)
        self._thread.start()

    @property
    def producing(self) -> bool:
        """Whether the thread is still decoding (False once its last item, or its error, is queued)."""
        return self._thread.is_alive()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(_DONE)
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and drop what it had decoded."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)

    def _run(self, make: Callable[[], Iterable[T]]) -> None:
        try:
            items = iter(make())
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    break
                finally:
                    self.busy_s += time.perf_counter() - t0
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the reader, which re-raises it
            self._put(_Failure(err))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _Failure:
    """An exception travelling through a queue (a bare exception object could be a legitimate item)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def ordered_streams(streams: Iterable[Callable[[], Iterable[T]]], workers: int, queue_size: int,
                    busy: list[float] | None = None) -> Iterator[T]:
    """All items of ``streams`` (each a callable returning an iterator), in order: every item of
    the first stream, then of the second, ..., while up to ``workers`` streams decode at once.

    Streams are started in order whenever fewer than ``workers`` are still producing, and at most
    ``2 * workers`` are held (finished ones wait, whole, in their queues), so memory stays below
    ``2 * workers * queue_size`` items. Only the oldest stream is ever waited on, and it was
    started before any younger one, so there is no deadlock whatever the sizes. ``busy`` (one
    float, if given) accumulates the streams' production time.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pending = iter(streams)
    window: collections.deque[Prefetcher[T]] = collections.deque()
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(window) < 2 * workers and sum(p.producing for p in window) < workers:
            make = next(pending, None)
            if make is None:
                exhausted = True
                return
            window.append(Prefetcher(make, queue_size, name=f"dinocache-decode-{len(window)}"))

    try:
        fill()
        while window:
            for item in window[0]:
                yield item
                fill()
            finished = window.popleft()
            if busy is not None:
                busy[0] += finished.busy_s
            fill()
    finally:
        for prefetcher in window:
            prefetcher.close()
            if busy is not None:
                busy[0] += prefetcher.busy_s


def iter_episode_batches(source: DatasetSource, episode_index: int,
                         cameras: Sequence[str] | None = None, batch_size: int = 32,
                         queue_size: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{camera_key: uint8 (b, H, W, 3)}`` with aligned batches for every camera.

    Each camera is decoded by its own :class:`Prefetcher`, so the cameras decode side by side and
    overlap the caller's work. All batches hold ``batch_size`` frames except the last. A decoding
    error in any camera is raised here, in the caller's thread. Closing the iterator early stops
    the threads.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = source.select_cameras(cameras)
    source.episode(episode_index)  # unknown / skipped episodes fail here, not in a thread
    streams = [Prefetcher(lambda key=key: rebatch(source.iter_frames(episode_index, key, batch_size=batch_size),
                                                  batch_size),
                          queue_size, name=f"dinocache-decode-{key}") for key in keys]
    try:
        while True:
            batch = {key: item for key, stream in zip(keys, streams) if (item := next(stream, None)) is not None}
            if not batch:
                return
            if len(batch) != len(keys):  # cannot happen: every stream holds `length` frames
                raise RuntimeError(f"camera streams of episode {episode_index} ended unevenly")
            yield batch
    finally:
        for stream in streams:
            stream.close()


def rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of frame batches of any sizes into batches of exactly ``batch_size`` (the last may be shorter)."""
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
