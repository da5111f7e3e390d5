"""Computing and writing work units: the backbone (and with ``--views``, the augmented views) on decoded
batches, and a writer thread that writes each finished unit whole.

Three stages overlap so that the backbone never waits: decoding (:mod:`dinocache.pipeline.decoding`)
hands frames over in a fixed order; the calling thread cuts them into fixed batches and runs the
backbone (which includes the one preprocessing module) on them; a writer thread writes each finished
work unit to the store and marks it done. Batches always start at a unit's first frame, so a unit's
features do not depend on which process, shard, resumed run or number of decode workers computed it:
the store is byte-identical. A store with augmented views runs each batch K times, view 0 as the
frames are (the very forward a store of one view runs) and views 1..K-1 through the recorded recipe
(:class:`~dinocache.encoders.augment.ViewAugmenter`), seeded per frame.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dinocache.datasets.base import DatasetSource
from dinocache.encoders.augment import ViewAugmenter
from dinocache.encoders.augment_recipe import AugmentRecipe
from dinocache.errors import StoreError
from dinocache.pipeline.decoding import decode_in_order
from dinocache.pipeline.store import FeatureStore

__all__ = ["ExtractSummary", "run_units"]


@dataclass
class ExtractSummary:
    """What one process did: printed at the end of `dinocache extract`."""

    store: Path
    frames: int = 0
    units: int = 0
    units_skipped: int = 0
    episodes: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0
    wait_decode_s: float = 0.0
    wait_write_s: float = 0.0
    decode_workers: int = 1
    skipped_episodes: list[tuple[int, str]] = field(default_factory=list)
    shard: tuple[int, int] | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: ExtractSummary) -> None:
        for name in ("frames", "units", "bytes_written", "decode_s", "forward_s", "write_s", "wait_decode_s",
                     "wait_write_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.decode_workers = max(self.decode_workers, other.decode_workers)

    @property
    def limit(self) -> str:
        """The stage that set the pace: what the backbone's thread spent most of its time on, waiting
        for decoded frames, running the forward, or waiting for the writer."""
        spent = {"decode": self.wait_decode_s, "forward": self.forward_s, "write": self.wait_write_s}
        return max(spent, key=spent.get)

    def _busy(self, seconds: float, workers: int = 1) -> str:
        return f"{100 * seconds / (workers * self.seconds):.0f} %" if self.seconds > 0 else "-"

    def format(self) -> str:
        lines = [
            f"store       {self.store}",
            f"frames      {self.frames} in {self.units} units ({self.units_skipped} already done), {self.episodes} episodes"
            + (f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""),
            f"written     {self.bytes_written / 2**20:.1f} MiB",
            f"throughput  {self.fps:.1f} frames/s over {self.seconds:.1f} s",
            f"busy time   decode {self.decode_s:.1f} s on {self.decode_workers} worker(s) ({self._busy(self.decode_s, self.decode_workers)}) "
            f"| forward {self.forward_s:.1f} s ({self._busy(self.forward_s)}) | write {self.write_s:.1f} s ({self._busy(self.write_s)})",
            f"limited by  {self.limit} (the forward waited {self.wait_decode_s:.1f} s for decoded frames "
            f"and {self.wait_write_s:.1f} s for the writer)",
        ]
        if self.skipped_episodes:
            lines.append(f"SKIPPED {len(self.skipped_episodes)} bad episode(s):")
            lines += [f"  episode {index}: {reason}" for index, reason in self.skipped_episodes]
        return "\n".join(lines)


@dataclass
class _Slot:
    """A reusable host buffer of one batch of frames (pinned on CUDA) and the copy that still reads it."""

    tensor: torch.Tensor
    array: np.ndarray
    copied: Any = None  # torch.cuda.Event once the host-to-device copy is queued


class _Forward:
    """The backbone on staged batches, one batch in flight while the next is prepared.

    On CUDA the host buffers are pinned once and reused; each batch's host-to-device copy runs on
    a side stream, so it overlaps the previous batch's forward; features are cast to the store
    dtype on the device (half the bytes to bring back for float16) and copied into reused pinned
    buffers without blocking; the busy time is the GPU's, from events. Other devices run the same
    bookkeeping synchronously, which is how the CPU tests exercise it.

    With an ``augmenter`` (a store of K > 1 views) each batch also goes through the backbone K-1 more
    times, augmented; what is delivered is then ``(K, n, ...)``, view 0 first. View 0's forward is the
    same call on the same batch as without views, so its features are the same bits.
    """

    def __init__(self, backbone: torch.nn.Module, device: str, dtype: str, batch_size: int,
                 deliver: Callable[[Any, np.ndarray, np.ndarray], None], timing: dict[str, float],
                 augmenter: ViewAugmenter | None = None) -> None:
        self.backbone, self.device, self.batch_size = backbone, torch.device(device), batch_size
        self.augmenter = augmenter
        self.dtype = getattr(torch, dtype)
        self.deliver, self.timing = deliver, timing
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots: dict[tuple[int, ...], list[_Slot]] = {}
        self.outputs: dict[tuple[tuple[int, ...], ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.in_flight: collections.deque = collections.deque()

    def slot(self, frame_shape: tuple[int, ...]) -> _Slot:
        """A free host buffer for ``batch_size`` frames of this shape: a reused one whose copy is done, else a new one."""
        free = self.slots.setdefault(frame_shape, [])
        for i, slot in enumerate(free):
            if slot.copied is None or slot.copied.query():
                return free.pop(i)
        if len(free) >= 2:  # enough buffers exist: wait for the oldest copy rather than pin more memory
            slot = free.pop(0)
            slot.copied.synchronize()
            return slot
        tensor = torch.empty((self.batch_size, *frame_shape), dtype=torch.uint8, pin_memory=self.cuda)
        return _Slot(tensor, tensor.numpy())

    def _views(self, images: torch.Tensor, camera: str, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids ``(K, n, h, w, C)`` and CLS tokens ``(K, n, C)`` in the store dtype, view 0 first."""
        batches = [images, *(self.augmenter(images, camera, rows) if self.augmenter is not None else [])]
        outputs = [self.backbone(batch) for batch in batches]
        grid = torch.stack([grid.permute(0, 2, 3, 1) for grid, _ in outputs])
        return grid.to(self.dtype, memory_format=torch.contiguous_format), torch.stack([cls for _, cls in outputs]).to(self.dtype)

    @staticmethod
    def _shapes(grid: torch.Tensor, cls: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        """What a pinned output buffer is reused for: the shapes without the batch axis."""
        return (grid.shape[0], *grid.shape[2:]), (cls.shape[0], *cls.shape[2:])

    def submit(self, slot: _Slot, n: int, tag: Any, camera: str, rows: range) -> None:
        """Queue the forward of the first ``n`` frames of ``slot`` (``camera``'s store ``rows``); deliver
        the batch before it."""
        t0 = time.perf_counter()
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                images = slot.tensor[:n].to(self.device, non_blocking=True)
                slot.copied = torch.cuda.Event()
                slot.copied.record(self.copy_stream)
            compute.wait_event(slot.copied)
            images.record_stream(compute)  # allocated on the copy stream, read on this one
            began = torch.cuda.Event(enable_timing=True)
            began.record(compute)
        else:
            images = slot.tensor[:n].to(self.device)
        grid, cls = self._views(images, camera, rows)
        self.slots[slot.array.shape[1:]].append(slot)  # reusable once `copied` has completed
        if self.cuda:
            free = self.outputs.setdefault(self._shapes(grid, cls), [])
            host = free.pop() if free else tuple(
                torch.empty((len(out), self.batch_size, *out.shape[2:]), dtype=self.dtype, pin_memory=True)
                for out in (grid, cls))
            host[0][:, :n].copy_(grid, non_blocking=True)
            host[1][:, :n].copy_(cls, non_blocking=True)
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(compute)
            self.in_flight.append((tag, n, host, (began, ended)))
        else:
            self.timing["forward_s"] += time.perf_counter() - t0
            self.in_flight.append((tag, n, (grid.cpu(), cls.cpu()), None))
        while len(self.in_flight) > 1:
            self._finish()

    def flush(self) -> None:
        """Deliver every batch still in flight."""
        while self.in_flight:
            self._finish()

    def _finish(self) -> None:
        tag, n, (grid, cls), events = self.in_flight.popleft()
        if events is not None:
            began, ended = events
            ended.synchronize()
            self.timing["forward_s"] += began.elapsed_time(ended) / 1000
        self.deliver(tag, grid[:, :n].numpy(), cls[:, :n].numpy())
        if events is not None:  # delivered (copied out): the pinned buffers can take another batch
            self.outputs[self._shapes(grid, cls)].append((grid, cls))


class _Batcher:
    """Cuts one camera's rows into its units' batches: each batch starts at its unit's first frame
    or ``batch_size`` frames after the previous one, whatever pieces decoding hands over, so a
    unit's features never depend on how, where or by how many workers it was decoded."""

    def __init__(self, store: FeatureStore, camera: str, forward: _Forward) -> None:
        self.store, self.camera, self.forward = store, camera, forward
        self.slot: _Slot | None = None
        self.unit = self.offset = self.filled = self.size = 0

    def add(self, row: int, frames: np.ndarray) -> None:
        while len(frames):
            if self.slot is None:
                self.unit = row // self.store.unit_frames
                start, stop = self.store.unit_range(self.unit)
                self.offset = row - start
                if self.offset % self.forward.batch_size:
                    raise StoreError(f"unit {self.unit}, camera {self.camera!r}: rows arrived out of order at {row}")
                self.size = min(self.forward.batch_size, stop - row)
                self.slot, self.filled = self.forward.slot(frames.shape[1:]), 0
            take = min(len(frames), self.size - self.filled)
            self.slot.array[self.filled:self.filled + take] = frames[:take]
            self.filled += take
            row += take
            frames = frames[take:]
            if self.filled == self.size:
                first = row - self.size
                self.forward.submit(self.slot, self.size, (self.unit, self.camera, self.offset), self.camera,
                                    range(first, row))
                self.slot = None


def _write(store: FeatureStore, inbox: queue.Queue, timing: dict[str, float], progress: tqdm | None,
           errors: list[BaseException]) -> None:
    """Writer thread: write each finished unit whole, then mark it done."""
    while (item := inbox.get()) is not None:
        unit, features = item
        if errors:
            continue
        try:
            t0 = time.perf_counter()
            store.write_unit(unit, features)
            timing["write_s"] += time.perf_counter() - t0
            if progress is not None:
                start, stop = store.unit_range(unit)
                progress.update(stop - start)
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller
            errors.append(err)


def run_units(store: FeatureStore, source: DatasetSource, backbone: torch.nn.Module, units: Sequence[int],
              batch_size: int, device: str, dtype: str, decode_workers: int = 1,
              progress: tqdm | None = None) -> ExtractSummary:
    """Compute and write ``units`` (skipping none: the caller chose them). Returns the busy times.

    ``decode_workers`` threads decode (episode, camera) streams at once; this thread cuts their
    frames into each unit's batches and runs the backbone; a writer thread writes each finished
    unit whole, in unit order. On an error every unit finished before it is still written. A store
    with augmented views gets them from its recorded recipe.
    """
    timing = {"decode_s": 0.0, "forward_s": 0.0, "write_s": 0.0, "wait_decode_s": 0.0, "wait_write_s": 0.0}
    decode_busy = [0.0]
    finished: queue.Queue = queue.Queue(maxsize=2)
    write_errors: list[BaseException] = []
    writer = threading.Thread(target=_write, args=(store, finished, timing, progress, write_errors),
                              daemon=True, name="dinocache-write")
    writer.start()
    features: dict[int, dict[str, list[np.ndarray]]] = {}
    remaining = {u: (lambda r: (r[1] - r[0]) * len(store.cameras))(store.unit_range(u)) for u in units}
    recipe = store.record.augment
    augmenter = None if recipe is None else ViewAugmenter(
        AugmentRecipe.from_dict(recipe, where=f"{store.path}: the recorded augmentation recipe"), store.views)

    def deliver(tag: tuple[int, str, int], grid: np.ndarray, cls: np.ndarray) -> None:
        """Take a batch's ``(K, n, ...)`` features: view 0 into the unit's clean arrays, views 1..K-1
        (frame axis first, as stored) into its views arrays."""
        unit, camera, offset = tag
        parts = [grid[0], cls[0]] + ([grid[1:].swapaxes(0, 1), cls[1:].swapaxes(0, 1)] if len(grid) > 1 else [])
        if camera not in features.setdefault(unit, {}):
            start, stop = store.unit_range(unit)
            features[unit][camera] = [np.empty((stop - start, *part.shape[1:]), part.dtype) for part in parts]
        for array, part in zip(features[unit][camera], parts):
            array[offset:offset + len(part)] = part
        remaining[unit] -= grid.shape[1]
        if remaining[unit] == 0:
            t0 = time.perf_counter()
            finished.put((unit, features.pop(unit)))
            timing["wait_write_s"] += time.perf_counter() - t0
            if write_errors:
                raise write_errors[0]

    forward = _Forward(backbone, device, dtype, batch_size, deliver, timing, augmenter)
    batchers = {camera: _Batcher(store, camera, forward) for camera in store.cameras}
    episodes = [(i, s, n) for i, s, n, _ in store.episodes()]
    decoded = decode_in_order(source, episodes, store.cameras, [store.unit_range(u) for u in units], batch_size,
                              decode_workers, decode_busy)
    t_begin = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            item = next(decoded, None)
            timing["wait_decode_s"] += time.perf_counter() - t0
            if item is None:
                break
            camera, row, frames = item
            batchers[camera].add(row, frames)
        forward.flush()
    except BaseException:
        # Deliver what the device already computed, so every unit finished before the error is
        # written; an error while doing so must not hide the first one.
        with contextlib.suppress(BaseException):
            forward.flush()
        raise
    finally:
        decoded.close()
        finished.put(None)
        writer.join()
    if write_errors:
        raise write_errors[0]
    if any(remaining.values()):  # cannot happen: every row of every unit was decoded
        raise StoreError(f"{store.path}: units {[u for u, n in remaining.items() if n]} were not completely computed")
    timing["decode_s"] = decode_busy[0]
    summary = ExtractSummary(store=store.path, units=len(units), decode_workers=decode_workers, **timing)
    summary.frames = sum(stop - start for start, stop in map(store.unit_range, units))
    summary.seconds = time.perf_counter() - t_begin
    return summary

