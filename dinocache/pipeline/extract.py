"""Stage one: run a frozen backbone once over every frame of a dataset and fill a feature store.

Three stages overlap so that the backbone never waits: ``--decode-workers`` threads decode several
(episode, camera) videos at once, each front to back, and hand their frames back in a fixed order;
the calling thread cuts them into fixed batches and runs the backbone (which includes the one
preprocessing module) on them; a writer thread writes each finished work unit to the store and marks
it done. Batches always start at a unit's first frame, so a unit's features do not depend on which
process, shard, resumed run or number of decode workers computed it: the store is byte-identical.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.cores import available_cores
from dinocache.devices import check_batch_fits, resolve_device
from dinocache.errors import DinocacheError, EpisodeError, StoreError
from dinocache.datasets import open_dataset
from dinocache.datasets.base import DatasetSource, EpisodeInfo, reading_episode
from dinocache.datasets.prefetch import ordered_streams
from dinocache.datasets.rows import frames_at_rows
from dinocache.pipeline.store import (
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_DTYPE,
    DEFAULT_UNIT_FRAMES,
    Compression,
    FeatureStore,
    SourceRecord,
    StoreLayout,
    StoreRecord,
    create_or_open,
    store_bytes,
)
from dinocache.pipeline.relayout import drop_recorded, relayout

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractConfig:
    """Everything `dinocache extract` is asked to do; see its ``--help`` for each field."""

    dataset: Path
    out: Path
    backbone: str = "dinov2_vits14_reg"
    weights: str = "auto"
    seed: int = 0
    cameras: Sequence[str] | None = None
    image_size: str | None = None
    center_crop: bool = False
    dtype: str = DEFAULT_DTYPE
    precision: str = "auto"
    batch_size: int = 32
    device: str | None = None
    episodes: str | None = None
    format: str | None = None
    skip_bad_episodes: bool = False
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    unit_frames: int = DEFAULT_UNIT_FRAMES
    compression: str = "none"
    overwrite: bool = False
    compile: bool = False
    shard: tuple[int, int] | None = None
    decode_workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        """Meaningless numbers are refused before any work (the command line's ranges say the same)."""
        for name, least in (("batch_size", 1), ("chunk_frames", 1), ("unit_frames", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DinocacheError(f"--{name.replace('_', '-')} {value}: must be a whole number of at least {least}")
        if self.unit_frames % self.chunk_frames:
            raise DinocacheError(f"--unit-frames {self.unit_frames}: must be a multiple of --chunk-frames "
                                 f"{self.chunk_frames} (a shard holds whole chunks)")

    def resolved_device(self) -> str:
        return str(resolve_device(self.device))

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.resolved_device().startswith("cuda") else "fp32"

    def resolved_decode_workers(self) -> int:
        """``--decode-workers``, by default one per available core (AV1 decodes ~250 frames/s per core)."""
        return self.decode_workers or available_cores()


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


# --- planning ------------------------------------------------------------------------------------

def parse_episodes(text: str | None, available: Sequence[int], skipped: Mapping[int, str] | None = None) -> list[int]:
    """``None`` -> all; ``'0:50'`` -> indices 0..49 (a slice of episode *indices*); ``'3,5,9'`` -> those.

    ``skipped`` maps episodes dropped by ``--skip-bad-episodes`` to why: asking for one by name is
    refused with that reason, not as an episode the dataset does not have.
    """
    if not text:
        return list(available)
    have = set(available)
    if ":" in text:
        lo, _, hi = text.partition(":")
        try:
            start = int(lo) if lo else min(available)
            stop = int(hi) if hi else max(available) + 1
        except ValueError:
            raise DinocacheError(f"--episodes {text!r}: expected START:STOP or a comma list of episode indices") from None
        chosen = [i for i in available if start <= i < stop]
    else:
        try:
            chosen = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise DinocacheError(f"--episodes {text!r}: expected START:STOP or a comma list of episode indices") from None
        missing = [i for i in chosen if i not in have]
        bad = [i for i in missing if i in (skipped or {})]
        if bad:
            raise DinocacheError(f"--episodes: episode {bad[0]} was skipped as bad (--skip-bad-episodes): "
                                 f"{skipped[bad[0]]}")
        if missing:
            raise DinocacheError(f"--episodes: episode(s) {missing} are not in the dataset (it has {len(have)}: "
                                 f"{min(have)}..{max(have)})")
    if not chosen:
        raise DinocacheError(f"--episodes {text!r} selects no episode")
    return chosen


def plan_layout(source: DatasetSource, episodes: Sequence[EpisodeInfo], cameras: Sequence[str],
                backbone: FrozenBackbone, cfg: ExtractConfig) -> StoreLayout:
    """Read every low-dimensional array (cheap) and decide the store's shapes and provenance."""
    lowdim: dict[str, list[np.ndarray]] = {key: [] for key in source.lowdim}
    episode_index, frame_index, timestamp, table = [], [], [], []
    start = 0
    for ep in episodes:
        arrays = source.read_lowdim(ep.index)
        for key in lowdim:
            lowdim[key].append(np.asarray(arrays[key], dtype=np.float32).reshape(ep.length, -1))
        episode_index.append(np.full(ep.length, ep.index, dtype=np.int64))
        frame_index.append(np.asarray(arrays["frame_index"], dtype=np.int64))
        timestamp.append(np.asarray(arrays["timestamp"], dtype=np.float32))
        table.append((ep.index, start, ep.length, ep.task))
        start += ep.length
    record = StoreRecord(
        num_frames=start, cameras=tuple(cameras), backbone=backbone.record(), dtype=cfg.dtype,
        chunk_frames=cfg.chunk_frames, unit_frames=cfg.unit_frames, compression=str(Compression.parse(cfg.compression)),
        precision=cfg.resolved_precision(), source=SourceRecord(source.format, source.fingerprint()),
        source_path=str(Path(source.path).resolve()), episodes_selected=tuple(ep.index for ep in episodes),
        fps=float(source.fps), camera_sizes={c: (source.cameras[c].height, source.cameras[c].width) for c in cameras},
        lowdim_names={k: info.names for k, info in source.lowdim.items()}, episodes_skipped=tuple(source.skipped),
    )
    h, w = backbone.grid_size
    return StoreLayout(
        record=record,
        grids={camera: (h, w, backbone.embed_dim) for camera in cameras},
        lowdim={key: np.concatenate(parts) for key, parts in lowdim.items()},
        episode_index=np.concatenate(episode_index),
        frame_index=np.concatenate(frame_index),
        timestamp=np.concatenate(timestamp),
        episodes=table,
        verification_frames=functools.partial(frames_at_rows, source, [(i, s, n) for i, s, n, _ in table], cameras),
    )


def shard_units(num_units: int, shard: tuple[int, int] | None) -> range:
    """The contiguous block of units that shard K of N owns (contiguous, so videos decode sequentially)."""
    if shard is None:
        return range(num_units)
    k, n = shard
    return range(k * num_units // n, (k + 1) * num_units // n)


# --- the overlapped pipeline ---------------------------------------------------------------------

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
    """

    def __init__(self, backbone: torch.nn.Module, device: str, dtype: str, batch_size: int,
                 deliver: Callable[[Any, np.ndarray, np.ndarray], None], timing: dict[str, float]) -> None:
        self.backbone, self.device, self.batch_size = backbone, torch.device(device), batch_size
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

    def submit(self, slot: _Slot, n: int, tag: Any) -> None:
        """Queue the forward of the first ``n`` frames of ``slot``; deliver the batch before it."""
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
        grid, cls = self.backbone(images)
        grid = grid.permute(0, 2, 3, 1).to(self.dtype, memory_format=torch.contiguous_format)
        cls = cls.to(self.dtype)
        self.slots[slot.array.shape[1:]].append(slot)  # reusable once `copied` has completed
        if self.cuda:
            free = self.outputs.setdefault((tuple(grid.shape[1:]), tuple(cls.shape[1:])), [])
            host = free.pop() if free else (
                torch.empty((self.batch_size, *grid.shape[1:]), dtype=self.dtype, pin_memory=True),
                torch.empty((self.batch_size, *cls.shape[1:]), dtype=self.dtype, pin_memory=True))
            host[0][:n].copy_(grid, non_blocking=True)
            host[1][:n].copy_(cls, non_blocking=True)
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
        self.deliver(tag, grid[:n].numpy(), cls[:n].numpy())
        if events is not None:  # delivered (copied out): the pinned buffers can take another batch
            self.outputs[(tuple(grid.shape[1:]), tuple(cls.shape[1:]))].append((grid, cls))


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
                self.forward.submit(self.slot, self.size, (self.unit, self.camera, self.offset))
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
    unit whole, in unit order. On an error every unit finished before it is still written.
    """
    timing = {"decode_s": 0.0, "forward_s": 0.0, "write_s": 0.0, "wait_decode_s": 0.0, "wait_write_s": 0.0}
    decode_busy = [0.0]
    finished: queue.Queue = queue.Queue(maxsize=2)
    write_errors: list[BaseException] = []
    writer = threading.Thread(target=_write, args=(store, finished, timing, progress, write_errors),
                              daemon=True, name="dinocache-write")
    writer.start()
    features: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    remaining = {u: (lambda r: (r[1] - r[0]) * len(store.cameras))(store.unit_range(u)) for u in units}

    def deliver(tag: tuple[int, str, int], grid: np.ndarray, cls: np.ndarray) -> None:
        unit, camera, offset = tag
        if camera not in features.setdefault(unit, {}):
            start, stop = store.unit_range(unit)
            features[unit][camera] = (np.empty((stop - start, *grid.shape[1:]), grid.dtype),
                                      np.empty((stop - start, *cls.shape[1:]), cls.dtype))
        features[unit][camera][0][offset:offset + len(grid)] = grid
        features[unit][camera][1][offset:offset + len(cls)] = cls
        remaining[unit] -= len(grid)
        if remaining[unit] == 0:
            t0 = time.perf_counter()
            finished.put((unit, features.pop(unit)))
            timing["wait_write_s"] += time.perf_counter() - t0
            if write_errors:
                raise write_errors[0]

    forward = _Forward(backbone, device, dtype, batch_size, deliver, timing)
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


# --- the command ---------------------------------------------------------------------------------

def build_backbone(cfg: ExtractConfig) -> FrozenBackbone:
    """The frozen backbone (with its preprocessing) that ``cfg`` asks for, on its device."""
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, center_crop=cfg.center_crop,
                               seed=cfg.seed, device=cfg.resolved_device(),
                               amp_dtype=PRECISIONS[cfg.resolved_precision()])
    return backbone


@dataclass(frozen=True)
class Selection:
    """What an extraction reads: the dataset, and the cameras and episodes of it asked for."""

    source: DatasetSource
    cameras: list[str]
    episodes: list[EpisodeInfo]


def open_source(cfg: ExtractConfig) -> Selection:
    """The cheap checks, before any backbone is built or weights looked for: the options, the dataset,
    the cameras and episodes asked for, and ``--out`` (a store or nothing yet). A mistyped path or
    camera is said at once, not after a weights lookup."""
    if cfg.dtype not in ("float16", "float32"):
        raise DinocacheError(f"--dtype {cfg.dtype!r}: choose float16 or float32")
    if cfg.unit_frames % cfg.chunk_frames:
        raise DinocacheError(f"--unit-frames {cfg.unit_frames} must be a multiple of --chunk-frames {cfg.chunk_frames}")
    if cfg.overwrite and cfg.shard is not None:
        raise DinocacheError("--overwrite with --shard would let one shard delete another's work; "
                             "delete the store (or run once without --shard) first")
    source = open_dataset(cfg.dataset, format=cfg.format, skip_bad_episodes=cfg.skip_bad_episodes)
    cameras = list(source.select_cameras(cfg.cameras) if cfg.cameras else source.cameras)
    if not cameras:
        raise DinocacheError(f"{cfg.dataset}: the dataset has no camera to extract features from")
    if Path(cfg.out).exists() and not cfg.overwrite:  # refuses, in one line, anything that is not a feature store
        drop_recorded(FeatureStore(cfg.out, mode="r"), source, cfg.skip_bad_episodes)
    return select(cfg, source, cameras)


def select(cfg: ExtractConfig, source: DatasetSource, cameras: list[str]) -> Selection:
    """The episodes of ``source`` that ``--episodes`` asks for (all listed ones by default)."""
    chosen = set(parse_episodes(cfg.episodes, [ep.index for ep in source.episodes], dict(source.skipped)))
    return Selection(source, cameras, [ep for ep in source.episodes if ep.index in chosen])


def leave_out_damaged(cfg: ExtractConfig, selected: Selection, err: EpisodeError) -> Selection:
    """With ``--skip-bad-episodes``, ``selected`` without the episode in which ``err`` found a damaged
    frame, as if opening had found it bad; without the flag, ``err`` itself."""
    if not cfg.skip_bad_episodes:
        raise err
    if cfg.shard is not None:
        raise DinocacheError(f"{err}; --skip-bad-episodes cannot leave an episode out of a store that --shard "
                             "processes fill together: re-run without --shard (it resumes) to leave it out") from None
    selected.source.drop_episode(err.episode, str(err))
    return select(cfg, selected.source, selected.cameras)


def prepare(cfg: ExtractConfig, backbone: FrozenBackbone, selected: Selection,
            left_out: bool = False) -> tuple[FeatureStore, ExtractSummary]:
    """Plan the layout of the selected features and create (or reopen) the store. Safe to run concurrently,
    but not when ``left_out`` (an episode left out since the store was laid out: it is laid out again)."""
    layout = plan_layout(selected.source, selected.episodes, selected.cameras, backbone, cfg)
    store = relayout(cfg.out, layout) if left_out else create_or_open(cfg.out, layout, overwrite=cfg.overwrite)
    summary = ExtractSummary(store=store.path, episodes=len(selected.episodes),
                             skipped_episodes=list(selected.source.skipped))
    return store, summary


def check_forward_fits(cfg: ExtractConfig, backbone: FrozenBackbone, source: DatasetSource,
                       cameras: Sequence[str]) -> None:
    """Refuse a ``--batch-size`` whose batch cannot fit, before the store is made or a buffer allocated.

    A lower bound per frame: its decoded uint8 frame in the host buffers, and on the device the
    preprocessed float32 input and the token embeddings (input and output of a block) in float32.
    """
    device = torch.device(cfg.resolved_device())
    frame = max(3 * source.camera(camera).height * source.camera(camera).width for camera in cameras)
    height, width = backbone.preprocess.config.image_size
    tokens = backbone.grid_size[0] * backbone.grid_size[1] + backbone.spec.num_prefix_tokens
    model = 4 * (3 * height * width + 2 * tokens * backbone.embed_dim)
    what = "decoded frames, the backbone's input and its tokens"
    if device.type == "cuda":
        check_batch_fits("--batch-size", cfg.batch_size, frame, torch.device("cpu"), "decoded frames")
        check_batch_fits("--batch-size", cfg.batch_size, model, device, "the backbone's input and its tokens")
    else:
        check_batch_fits("--batch-size", cfg.batch_size, frame + model, device, what)


def redo_damaged_units(store: FeatureStore, units: Sequence[int]) -> None:
    """Mark for redoing, and say so, the units of ``units`` that are done but whose shard files are
    missing or not the ones written for them (another unit's or store's, or damaged)."""
    for unit, why in store.reopen_damaged_units(units).items():
        start, stop = store.unit_range(unit)
        tqdm.write(f"dinocache: unit {unit} (frames {start}-{stop - 1}) was marked done, but {why}: redoing it")


def extract(cfg: ExtractConfig, backbone: FrozenBackbone | None = None) -> ExtractSummary:
    """Fill this process's share of the store (all of it unless ``cfg.shard``); skip units already done."""
    t_begin = time.perf_counter()
    selected = open_source(cfg)
    backbone = backbone or build_backbone(cfg)
    check_forward_fits(cfg, backbone, selected.source, selected.cameras)
    left_out = False
    while True:  # once more for each episode found damaged in the middle of it (--skip-bad-episodes)
        try:
            summary = fill(cfg, *prepare(cfg, backbone, selected, left_out), backbone, selected.source)
            break
        except EpisodeError as err:
            selected, left_out = leave_out_damaged(cfg, selected, err), True
    summary.seconds = time.perf_counter() - t_begin
    return summary


def fill(cfg: ExtractConfig, store: FeatureStore, summary: ExtractSummary, backbone: FrozenBackbone,
         source: DatasetSource) -> ExtractSummary:
    """Compute and write this process's units of ``store`` that are not done yet."""
    mine = shard_units(store.num_units, cfg.shard)
    redo_damaged_units(store, mine)
    done = store.done_units()
    pending = [u for u in mine if not done[u]]
    summary.units_skipped, summary.shard = len(mine) - len(pending), cfg.shard
    frames_total = sum(b - a for a, b in (store.unit_range(u) for u in mine))
    frames_done = frames_total - sum(b - a for a, b in (store.unit_range(u) for u in pending))
    model = torch.compile(backbone) if cfg.compile else backbone
    with tqdm(total=frames_total, initial=frames_done, unit="frame", disable=not cfg.progress,
              desc=f"extract {store.path.name}", dynamic_ncols=True) as bar:
        if pending:
            summary.merge(run_units(store, source, model, pending, cfg.batch_size, cfg.resolved_device(),
                                    cfg.dtype, cfg.resolved_decode_workers(), progress=bar))
    summary.bytes_written = store_bytes(store.path)
    return summary

