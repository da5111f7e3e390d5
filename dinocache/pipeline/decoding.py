"""Decoding for extraction: every wanted row of every (episode, camera), by several workers, in one fixed order.

Apart from the rest of stage one (:mod:`dinocache.pipeline.units` computes and writes what this
hands over) because decoding has its own concerns: how many videos are decoded at once, how far they
may run ahead in memory, and how many FFmpeg threads each gets, none of which may change a byte of
the store.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from dinocache.cores import available_cores
from dinocache.datasets.base import DatasetSource, reading_episode
from dinocache.datasets.prefetch import ordered_streams

__all__ = ["decode_ahead_bytes", "decoder_threads", "decode_in_order"]


def decode_ahead_bytes() -> int:
    """How many bytes of decoded frames may wait for the backbone: an eighth of the RAM, at most 8 GiB.

    They wait in up to ``2 * decode_workers`` (episode, camera) streams, each holding its share.
    Decoding in order with several workers needs the younger streams to run ahead by about an
    episode each (16 workers, 400-frame 480x640 episodes: ~6 GiB), so a smaller share costs
    parallelism, never correctness.
    """
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX
        ram = 16 * 2**30
    return min(ram // 8, 8 * 2**30)


def _spans(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, stop)`` row ranges merged where they touch."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def decoder_threads(workers: int, streams: int) -> int:
    """FFmpeg threads per decoder when ``workers`` decode ``streams`` videos at once: the cores shared
    among the decoders that can run together. FFmpeg's own default (a thread per core in every
    decoder) puts workers x cores threads on the cores, 256 on a 16-core host. On 2 cores the two
    were within noise of each other; many cores decide (docs/benchmarks.md, "Extraction")."""
    return max(1, available_cores() // max(1, min(workers, streams)))


def decode_in_order(source: DatasetSource, episodes: Sequence[tuple[int, int, int]], cameras: Sequence[str],
                    spans: Sequence[tuple[int, int]], batch_size: int, workers: int,
                    busy: list[float] | None = None,
                    threads: int | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(camera, first store row, uint8 frames)`` for every row in ``spans``, decoded by ``workers`` threads.

    ``episodes`` are ``(index, first store row, length)``. Each (episode, camera) that holds a wanted
    row is one stream, decoded whole and front to back by one worker (a video cannot be entered in
    the middle without decoding from its start); rows outside ``spans`` (units already done) are
    decoded and dropped. Items come back episode by episode, camera by camera, rows ascending,
    whatever the number of workers: that order, not the timing, decides what the caller computes.
    A decoding error is raised here at its place in that order, after every item before it, as an
    :class:`~dinocache.errors.EpisodeError` naming the episode and camera.
    ``threads``: FFmpeg threads per decoder, by default :func:`decoder_threads`; 0 is FFmpeg's choice.
    """
    spans = _spans(spans)

    def wanted(start: int, length: int) -> list[tuple[int, int]]:
        return [(max(a, start), min(b, start + length)) for a, b in spans if a < start + length and b > start]

    def stream(index: int, start: int, camera: str, rows: list[tuple[int, int]],
               threads: int) -> Iterator[tuple[str, int, np.ndarray]]:
        with reading_episode(index, camera):
            row, batches = start, source.iter_frames(index, camera, batch_size=batch_size, decoder_threads=threads)
            for frames in batches:
                for a, b in rows:
                    lo, hi = max(a, row), min(b, row + len(frames))
                    if lo < hi:
                        yield camera, lo, frames[lo - row:hi - row]
                row += len(frames)
                if row >= rows[-1][1]:  # nothing wanted further on (a shard or resume boundary): release the video now
                    getattr(batches, "close", lambda: None)()
                    return

    largest = max(source.cameras[c].height * source.cameras[c].width * 3 for c in cameras)
    queue_size = max(2, decode_ahead_bytes() // (2 * workers * batch_size * largest))
    todo = [(index, start, camera, rows) for index, start, length in episodes if (rows := wanted(start, length))
            for camera in cameras]
    threads = decoder_threads(workers, len(todo)) if threads is None else threads
    streams = [functools.partial(stream, *args, threads) for args in todo]
    return ordered_streams(streams, workers, queue_size, busy)

