"""Stage one: run a frozen backbone once over every frame of a dataset and fill a feature store.

Three stages overlap so that the backbone never waits: a decode thread reads each video once,
sequentially, and cuts the frames into fixed batches; the calling thread runs the backbone (which
includes the one preprocessing module) on them; a writer thread writes each finished work unit to the
store and marks it done. Batches always start at a unit's first frame, so a unit's features do not
depend on which process, shard or resumed run computed it: a resumed or sharded extraction is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.errors import DinocacheError, StoreError
from dinocache.pipeline.readers import open_dataset
from dinocache.pipeline.readers.base import DatasetSource, EpisodeInfo
from dinocache.pipeline.store import Compression, FeatureStore, StoreLayout, create_or_open

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
    dtype: str = "float16"
    precision: str = "auto"
    batch_size: int = 32
    device: str | None = None
    episodes: str | None = None
    format: str | None = None
    skip_bad_episodes: bool = False
    chunk_frames: int = 16
    unit_frames: int = 256
    compression: str = "none"
    overwrite: bool = False
    compile: bool = False
    shard: tuple[int, int] | None = None
    progress: bool = True

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.resolved_device().startswith("cuda") else "fp32"


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
    skipped_episodes: list[tuple[int, str]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: ExtractSummary) -> None:
        for name in ("frames", "units", "bytes_written", "decode_s", "forward_s", "write_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def format(self) -> str:
        lines = [
            f"store       {self.store}",
            f"frames      {self.frames} in {self.units} units ({self.units_skipped} already done), {self.episodes} episodes",
            f"written     {self.bytes_written / 2**20:.1f} MiB",
            f"throughput  {self.fps:.1f} frames/s over {self.seconds:.1f} s",
            f"busy time   decode {self.decode_s:.1f} s | forward {self.forward_s:.1f} s | write {self.write_s:.1f} s",
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


def backbone_provenance(backbone: FrozenBackbone) -> dict[str, Any]:
    """What a store records about its backbone: ``backbone``, ``weights`` (hashes, seed; no path),
    ``weights_path`` (informative) and ``preprocess``; stage three rebuilds the backbone from it."""
    prov = backbone.provenance()
    weights = dict(prov.pop("weights"))
    weights_path = weights.pop("path", None)
    preprocess = prov.pop("preprocess")
    return {"backbone": prov, "weights": weights, "weights_path": weights_path, "preprocess": preprocess}


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
    h, w = backbone.grid_size
    return StoreLayout(
        num_frames=start,
        grids={camera: (h, w, backbone.embed_dim) for camera in cameras},
        lowdim={key: np.concatenate(parts) for key, parts in lowdim.items()},
        episode_index=np.concatenate(episode_index),
        frame_index=np.concatenate(frame_index),
        timestamp=np.concatenate(timestamp),
        episodes=table,
        provenance={
            **backbone_provenance(backbone),
            "precision": cfg.resolved_precision(),
            "source": {"format": source.format, "fingerprint": source.fingerprint()},
            "source_path": str(Path(source.path).resolve()),
            "episodes_selected": [ep.index for ep in episodes],
            "fps": float(source.fps),
            "camera_sizes": {c: [source.cameras[c].height, source.cameras[c].width] for c in cameras},
            "lowdim_names": {k: info.names for k, info in source.lowdim.items()},
        },
        dtype=cfg.dtype,
        chunk_frames=cfg.chunk_frames,
        unit_frames=cfg.unit_frames,
        compression=Compression.parse(cfg.compression),
        verification_frames=functools.partial(frames_at_rows, source, [(i, s, n) for i, s, n, _ in table], cameras),
    )


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


def shard_units(num_units: int, shard: tuple[int, int] | None) -> range:
    """The contiguous block of units that shard K of N owns (contiguous, so videos decode sequentially)."""
    if shard is None:
        return range(num_units)
    k, n = shard
    return range(k * num_units // n, (k + 1) * num_units // n)


# --- the overlapped pipeline ---------------------------------------------------------------------

class _FrameCursor:
    """Sequential frames of one camera across consecutive units: each episode is decoded once."""

    def __init__(self, source: DatasetSource, camera: str, batch_size: int) -> None:
        self.source, self.camera, self.batch_size = source, camera, batch_size
        self.episode: int | None = None
        self.position = 0
        self.pending = np.empty((0,), dtype=np.uint8)
        self.iterator: Iterator[np.ndarray] | None = None

    def take(self, episode: int, start: int, stop: int) -> Iterator[np.ndarray]:
        """Yield frames ``start..stop-1`` of ``episode`` in pieces; reopens only when going backwards."""
        if self.episode != episode or self.position > start:
            self.iterator = self.source.iter_frames(episode, self.camera, batch_size=self.batch_size)
            self.episode, self.position, self.pending = episode, 0, np.empty((0,), dtype=np.uint8)
        while self.position < stop:
            if len(self.pending) == 0:
                self.pending = next(self.iterator)
            lo = max(start - self.position, 0)
            n = min(len(self.pending), stop - self.position)
            if lo < n:
                yield self.pending[lo:n]
            self.pending = self.pending[n:]
            self.position += n


def _segments(episodes: Sequence[tuple[int, int, int]], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(episode, local_start, local_stop) pieces covering global frames [start, stop) of the store."""
    for index, ep_start, length in episodes:
        lo, hi = max(start, ep_start), min(stop, ep_start + length)
        if lo < hi:
            yield index, lo - ep_start, hi - ep_start


def _rebatch(pieces: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Cut a stream of frame arrays into batches of exactly ``batch_size`` (the last may be shorter)."""
    buffer: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        while held >= batch_size:
            frames = np.concatenate(buffer)
            yield frames[:batch_size]
            rest = frames[batch_size:]
            buffer, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield np.concatenate(buffer)


def _decode(source: DatasetSource, store: FeatureStore, units: Sequence[int], batch_size: int,
            out: queue.Queue, stop_event: threading.Event, timing: dict[str, float]) -> None:
    """Producer thread: put (unit, camera, offset, uint8 batch) items, then (unit, None, 0, None) per unit."""
    try:
        episodes = [(i, s, n) for i, s, n, _ in store.episodes()]
        cursors = {camera: _FrameCursor(source, camera, batch_size) for camera in store.cameras}
        for unit in units:
            start, stop = store.unit_range(unit)
            for camera in store.cameras:
                pieces = (piece for episode, lo, hi in _segments(episodes, start, stop)
                          for piece in cursors[camera].take(episode, lo, hi))
                offset, t0 = 0, time.perf_counter()
                for batch in _rebatch(pieces, batch_size):
                    timing["decode_s"] += time.perf_counter() - t0
                    if stop_event.is_set():
                        return
                    out.put((unit, camera, offset, batch))
                    offset += len(batch)
                    t0 = time.perf_counter()
                if offset != stop - start:
                    raise StoreError(f"unit {unit}, camera {camera!r}: decoded {offset} frames, expected {stop - start}")
            out.put((unit, None, 0, None))
    except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
        out.put(err)
    finally:
        out.put(None)


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
              batch_size: int, device: str, dtype: str, progress: tqdm | None = None) -> ExtractSummary:
    """Compute and write ``units`` (skipping none: the caller chose them). Returns the busy times."""
    timing = {"decode_s": 0.0, "forward_s": 0.0, "write_s": 0.0}
    decoded: queue.Queue = queue.Queue(maxsize=4)
    finished: queue.Queue = queue.Queue(maxsize=2)
    stop_event, write_errors = threading.Event(), []
    producer = threading.Thread(target=_decode, args=(source, store, units, batch_size, decoded, stop_event, timing),
                                daemon=True, name="dinocache-decode")
    writer = threading.Thread(target=_write, args=(store, finished, timing, progress, write_errors),
                              daemon=True, name="dinocache-write")
    producer.start()
    writer.start()
    buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pin = device.startswith("cuda")
    t_begin = time.perf_counter()
    try:
        while (item := decoded.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            unit, camera, offset, frames = item
            if camera is None:
                finished.put((unit, buffers))
                buffers = {}
                if write_errors:
                    raise write_errors[0]
                continue
            t0 = time.perf_counter()
            images = torch.from_numpy(frames)
            images = images.pin_memory().to(device, non_blocking=True) if pin else images
            grid, cls = backbone(images)
            grid = grid.permute(0, 2, 3, 1).to("cpu", torch.float32).numpy().astype(dtype)
            cls = cls.to("cpu", torch.float32).numpy().astype(dtype)
            if camera not in buffers:
                start, stop = store.unit_range(unit)
                buffers[camera] = (np.empty((stop - start, *grid.shape[1:]), dtype),
                                   np.empty((stop - start, cls.shape[1]), dtype))
            buffers[camera][0][offset:offset + len(frames)] = grid
            buffers[camera][1][offset:offset + len(frames)] = cls
            timing["forward_s"] += time.perf_counter() - t0
    finally:
        stop_event.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                decoded.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        finished.put(None)
        writer.join()
    if write_errors:
        raise write_errors[0]
    summary = ExtractSummary(store=store.path, units=len(units), **timing)
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


def prepare(cfg: ExtractConfig, backbone: FrozenBackbone) -> tuple[DatasetSource, FeatureStore, ExtractSummary]:
    """Open the dataset, plan the layout, and create (or reopen) the store. Safe to run concurrently."""
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
    chosen = set(parse_episodes(cfg.episodes, [ep.index for ep in source.episodes], dict(source.skipped)))
    episodes = [ep for ep in source.episodes if ep.index in chosen]
    layout = plan_layout(source, episodes, cameras, backbone, cfg)
    store = create_or_open(cfg.out, layout, overwrite=cfg.overwrite)
    summary = ExtractSummary(store=store.path, episodes=len(episodes), skipped_episodes=list(source.skipped))
    return source, store, summary


def extract(cfg: ExtractConfig, backbone: FrozenBackbone | None = None) -> ExtractSummary:
    """Fill this process's share of the store (all of it unless ``cfg.shard``); skip units already done."""
    t_begin = time.perf_counter()
    backbone = backbone or build_backbone(cfg)
    source, store, summary = prepare(cfg, backbone)
    mine = shard_units(store.num_units, cfg.shard)
    done = store.done_units()
    pending = [u for u in mine if not done[u]]
    summary.units_skipped = len(mine) - len(pending)
    frames_total = sum(b - a for a, b in (store.unit_range(u) for u in mine))
    frames_done = frames_total - sum(b - a for a, b in (store.unit_range(u) for u in pending))
    model = torch.compile(backbone) if cfg.compile else backbone
    with tqdm(total=frames_total, initial=frames_done, unit="frame", disable=not cfg.progress,
              desc=f"extract {store.path.name}", dynamic_ncols=True) as bar:
        if pending:
            summary.merge(run_units(store, source, model, pending, cfg.batch_size, cfg.resolved_device(),
                                    cfg.dtype, progress=bar))
    summary.bytes_written = store_bytes(store.path)
    summary.seconds = time.perf_counter() - t_begin
    return summary


def store_bytes(path: Path) -> int:
    """Bytes on disk under a store."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
