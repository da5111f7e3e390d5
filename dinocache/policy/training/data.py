"""Training data for the ACT head, read straight from a feature store: no video, no backbone.

Two ways to get features, chosen by the memory budget:

* **In memory** (the usual case: 100k frames of ViT-S at 16x16 patches are 20 GB in float16). The
  feature arrays are read once, shard by shard, into one tensor per camera, on the GPU when they fit
  its budget (else in RAM); a batch is then a single ``torch.index_select`` per array (into a pinned
  buffer when gathered on the host), and the action windows a single advanced-indexing gather with
  precomputed episode ends. No per-sample Python, no DataLoader workers.
* **Streaming**, when the features do not fit. The store is read in whole Zarr chunks (16 frames by
  default: reading one frame costs nearly as much as reading its chunk). Each epoch visits the
  chunks in a random order, a *window* of them at a time; a window is loaded whole (the next one is
  read ahead on another thread) and its frames are shuffled together: a shuffle buffer of
  ``window`` frames drawn from random places in the dataset.

Either way a background thread assembles batches ahead of the training step, so the step only waits
for data when loading is slower than computing; the training loop measures that wait.

What a sample is and which episodes train: :mod:`~dinocache.policy.training.episodes`; the order
samples are drawn in: :mod:`~dinocache.policy.training.sampling`; how batches reach the step:
:mod:`~dinocache.policy.training.batches`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinocache.devices import available_device_memory, parse_memory_budget
from dinocache.errors import StoreError
from dinocache.keys import short_name
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.model.config import ACTION, ACTION_IS_PAD, FEATURES_PREFIX, OBS_ENV_STATE, OBS_STATE, ACTInputs
from dinocache.policy.model.normalize import Normalizer
from dinocache.policy.training.batches import Batch, BatchStream, DeviceBatches, HostBatches
from dinocache.policy.training.episodes import action_windows
from dinocache.policy.training.feature_augment import ViewDraw, loaded_views
from dinocache.policy.training.sampling import SampleOrder

__all__ = ["CachedFeatures", "Block", "ResidentBatches", "DEFAULT_WINDOW_FRAMES"]

#: Most frames a streaming shuffle window holds by default (its memory is also capped by the budget).
DEFAULT_WINDOW_FRAMES = 8192


#: Concurrent chunk reads when streaming.
READ_THREADS = 4


@dataclass
class Block:
    """Feature tables for a set of store rows: the whole store, or the whole chunks ``chunks``.

    ``tables`` maps batch keys (``features.<cam>`` with rows ``(n, h, w, C)``, ``cls.<cam>`` with
    ``(n, C)``) to tensors whose row ``i`` is the ``i``-th loaded frame.
    """

    tables: dict[str, Tensor]
    chunks: np.ndarray | None = None
    chunk_frames: int = 1

    def local(self, rows: np.ndarray) -> np.ndarray:
        """Positions of store ``rows`` in the tables."""
        if self.chunks is None:
            return rows
        chunk = rows // self.chunk_frames
        return np.searchsorted(self.chunks, chunk) * self.chunk_frames + rows % self.chunk_frames


def _finite(store: FeatureStore, name: str, values: Tensor, start: int, why: str) -> Tensor:
    """``values`` (rows ``start...`` of the store's array ``name``), refused if any is NaN or inf.

    A chunk file deleted or lost after it was written reads as Zarr's NaN fill value, and a single
    NaN makes the loss, then every weight, NaN at the first step that draws it: refused here, before
    training on it, naming the array and its frames.
    """
    if torch.isfinite(values).all():
        return values
    bad = torch.nonzero(~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)).flatten() + start
    raise StoreError(
        f"{store.path}: array {name!r} holds NaN or inf in {len(bad)} frame(s) of {start}-{start + len(values) - 1} "
        f"(first {int(bad[0])}, last {int(bad[-1])}) {why}. Check it with `dinocache inspect`, then re-extract "
        f"(--overwrite)")


class CachedFeatures:
    """A complete feature store as the ACT head sees it: normalised low-dim arrays, features, batches.

    Low-dimensional arrays (state, environment state, action) are small and always held in RAM,
    normalised once with the store's statistics through a :class:`Normalizer`, the same module the
    exported policy carries. Features are held in RAM when they fit ``memory_budget`` bytes, else
    streamed (see the module docstring).

    Args:
        store: An opened, complete store (:func:`open_training_store`).
        chunk_size: Actions per sample.
        use_cls_token: Also provide ``cls.<camera>``.
        memory_budget: Bytes the features may take in RAM (see :func:`parse_memory_budget`).
        device: Where the training step runs and its batches are delivered.
        device_budget: Bytes of device memory the features may take, to be held on a CUDA ``device``
            and gathered there (default: :data:`DEFAULT_MEMORY_SHARE` of its free memory); they are
            then loaded straight onto it and need no room in RAM. Features in RAM that do not fit
            are gathered on the host into pinned buffers and copied over ahead of the step. On the
            CPU, features in RAM are on the device.
        window_frames: Frames per streaming shuffle window; default: as many as a sixth of the budget
            holds (three windows are alive at once, current, read-ahead and one being gathered from),
            at most :data:`DEFAULT_WINDOW_FRAMES`.
        progress: Show a bar while loading features into memory.
        view_sampling: With a store of K views, ``uniform`` holds all K and each training sample draws
            one (:mod:`~dinocache.policy.training.feature_augment`); ``clean`` holds view 0 only. Tables then
            hold a frame's views in consecutive rows; validation reads view 0.
    """

    def __init__(self, store: FeatureStore, chunk_size: int, use_cls_token: bool = False,
                 memory_budget: int | None = None, device: str | torch.device = "cpu", device_budget: int | None = None,
                 window_frames: int | None = None, progress: bool = False, view_sampling: str = "uniform") -> None:
        self.store = store
        self.views = loaded_views(store, view_sampling)
        self.chunk_size = chunk_size
        self.use_cls_token = use_cls_token
        self.device = torch.device(device)
        self.chunk_frames = store.record.chunk_frames

        self.has_env_state = OBS_ENV_STATE in store.lowdim_keys
        keys = [OBS_STATE, ACTION] + ([OBS_ENV_STATE] if self.has_env_state else [])
        self.stats = {key: store.stats(key) for key in keys}
        self.normalizer = Normalizer(self.stats)
        raw = {key: _finite(store, key, torch.from_numpy(store.read(key)).float().reshape(store.num_frames, -1), 0,
                            "(written whole when the store was made: a chunk file is missing or damaged)")
               for key in keys}
        self.lowdim = {key: self.normalizer.normalize(key, values) for key, values in raw.items()}

        ends = np.zeros(store.num_frames, dtype=np.int64)
        for _, start, length, _ in store.episodes():
            ends[start:start + length] = start + length
        self.episode_end = torch.from_numpy(ends)

        self.camera_keys = {short_name(cam): cam for cam in store.cameras}
        try:
            self.inputs = ACTInputs(
                cameras=[(name, store.grid_shape(cam)[2], *store.grid_shape(cam)[:2])
                         for name, cam in self.camera_keys.items()],
                state_dim=self.lowdim[OBS_STATE].shape[1],
                action_dim=self.lowdim[ACTION].shape[1],
                env_state_dim=self.lowdim[OBS_ENV_STATE].shape[1] if self.has_env_state else None,
            )
            if len(self.camera_keys) != len(store.cameras):
                raise ValueError(f"cameras {store.cameras} do not have distinct short names")
        except ValueError as err:
            raise StoreError(f"{store.path}: cannot feed this store to the ACT head: {err}") from None
        self.feature_dtype = getattr(torch, store.record.dtype)
        self.memory_budget = parse_memory_budget(None) if memory_budget is None else int(memory_budget)
        if device_budget is None:
            device_budget = parse_memory_budget(None, available=lambda: available_device_memory(self.device))
        fits_device = self.device.type == "cuda" and self.feature_bytes <= device_budget
        #: All features loaded once (on the device when they fit there, else in RAM), sampled frame by frame.
        self.in_memory = fits_device or self.feature_bytes <= self.memory_budget
        #: Features held where the step runs, batches gathered there from index tensors (no host work).
        self.on_device = self.in_memory and (self.device.type == "cpu" or fits_device)
        self.pin_memory = self.device.type == "cuda" and not self.on_device
        if window_frames is None:
            window_frames = min(DEFAULT_WINDOW_FRAMES, self.memory_budget // (6 * self.bytes_per_frame))
        self.window_chunks = max(1, int(window_frames) // self.chunk_frames)
        self._readers: ThreadPoolExecutor | None = None
        # Loaded straight onto the device, a unit at a time: no whole copy in RAM beside the device's,
        # which matters with one DDP rank per GPU, each of which would otherwise hold its own.
        self.resident = self._load_all(progress, self.device if self.on_device else "cpu") if self.in_memory else None
        self._device_tables: tuple[Block, dict[str, Tensor], Tensor] | None = None
        if self.on_device:
            self._device_tables = (self.resident, {key: value.to(self.device) for key, value in self.lowdim.items()},
                                   self.episode_end.to(self.device))

    # -- sizes -------------------------------------------------------------------------------------
    def _table_shapes(self) -> dict[str, tuple[int, ...]]:
        """Batch key -> per-frame shape of every feature table (keys use the head's camera names)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, cam in self.camera_keys.items():
            h, w, c = self.store.grid_shape(cam)
            shapes[ACTInputs.feature_key(name)] = (h, w, c)
            if self.use_cls_token:
                shapes[ACTInputs.cls_key(name)] = (c,)
        return shapes

    @property
    def bytes_per_frame(self) -> int:
        item = torch.finfo(self.feature_dtype).bits // 8
        return self.views * sum(math.prod(shape) * item for shape in self._table_shapes().values())

    @property
    def feature_bytes(self) -> int:
        """Bytes all features would take in RAM."""
        return self.store.num_frames * self.bytes_per_frame

    # -- loading -----------------------------------------------------------------------------------
    def _array_name(self, key: str) -> str:
        """The store array behind a batch key: ``cameras/<camera>/patch`` or ``cameras/<camera>/cls``."""
        kind, _, name = key.partition(".")
        return f"cameras/{self.camera_keys[name]}/{'patch' if kind + '.' == FEATURES_PREFIX else 'cls'}"

    def _read(self, key: str, start: int, stop: int) -> Tensor:
        """Store rows ``start..stop-1`` of one feature table, refused if any value is NaN or inf.

        ``units/done`` only says a unit was written once: a shard file deleted or lost since reads
        as Zarr's NaN fill value, and a single NaN frame makes the loss, then every weight, NaN
        at the first step that draws it. Checking here costs one pass over data just read from
        disk, and catches it before training on it (in memory) or as its chunk arrives (streamed).
        """
        name = self._array_name(key)
        values = torch.from_numpy(self.store.view_features(name, start, stop, self.views))
        return _finite(self.store, name, values, start,
                       "although every unit is marked done: a shard file is missing or damaged").flatten(0, 1)

    def _load_all(self, progress: bool, device: str | torch.device) -> Block:
        """Read every feature array into tables on ``device``, one shard (work unit) at a time."""
        from tqdm.auto import tqdm

        n = self.store.num_frames
        tables = {key: torch.empty((n * self.views, *shape), dtype=self.feature_dtype, device=device)
                  for key, shape in self._table_shapes().items()}
        units = [self.store.unit_range(u) for u in range(self.store.num_units)]
        with tqdm(total=n * len(tables), unit="frame", desc="load features", disable=not progress, leave=False) as bar:
            for key, table in tables.items():
                for start, stop in units:
                    table[start * self.views:stop * self.views] = self._read(key, start, stop)
                    bar.update(stop - start)
        return Block(tables)

    def load_chunks(self, chunks: np.ndarray) -> Block:
        """Read whole store chunks (sorted ids) into a block.

        Consecutive chunks are read as one slice, and the slices are read concurrently: each one is
        a separate file read plus decode, and on network filesystems latency, not bandwidth, is what
        a random-chunk read pays for.
        """
        if self.resident is not None:
            return self.resident
        cf, n = self.chunk_frames, self.store.num_frames
        breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
        runs = [(int(run[0]) * cf, min((int(run[-1]) + 1) * cf, n)) for run in np.split(chunks, breaks)]
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dinocache-read")
        tables = {}
        for key in self._table_shapes():
            parts = self._readers.map(lambda run, key=key: self._read(key, *run), runs)
            tables[key] = torch.cat(list(parts))
        return Block(tables, chunks=np.asarray(chunks), chunk_frames=cf)

    # -- batches -----------------------------------------------------------------------------------
    def batch_buffers(self, batch_size: int, device: str | torch.device = "cpu", pin: bool = False) -> Batch:
        """Empty tensors for one batch, laid out as :meth:`gather` fills them.

        Features are channels-first views ``(B, C, h, w)`` of channels-last buffers (the store's row
        layout, which is ``torch.channels_last``), as stored (float16 by default; the head casts them).
        """
        def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.empty((batch_size, *shape), dtype=dtype, device=device, pin_memory=pin)

        batch: Batch = {}
        for key, shape in self._table_shapes().items():
            buffer = empty(shape, self.feature_dtype)
            batch[key] = buffer.permute(0, 3, 1, 2) if buffer.dim() == 4 else buffer
        for key, table in self.lowdim.items():
            if key != ACTION:
                batch[key] = empty(tuple(table.shape[1:]), table.dtype)
        batch[ACTION] = empty((self.chunk_size, self.lowdim[ACTION].shape[1]), self.lowdim[ACTION].dtype)
        batch[ACTION_IS_PAD] = empty((self.chunk_size,), torch.bool)
        return batch

    def _fill(self, out: Batch, parts: Sequence[tuple[Block, Tensor]], rows: Tensor, lowdim: dict[str, Tensor],
              episode_end: Tensor, views: Tensor | None = None) -> Batch:
        """Write the batch of store ``rows`` into ``out``: one ``index_select`` per array, on the tables' device.

        ``parts`` are ``(block, frame positions in its tables)``, in the order of ``rows``; ``lowdim`` and
        ``episode_end`` are indexed by store row; ``views`` is each row's view (None: view 0).
        """
        for key in self._table_shapes():
            target, offset = out[key], 0
            target = target.permute(0, 2, 3, 1) if target.dim() == 4 else target  # the channels-last buffer
            for block, local in parts:
                index = local if self.views == 1 else local * self.views + (
                    0 if views is None else views[offset:offset + len(local)])
                torch.index_select(block.tables[key], 0, index, out=target[offset:offset + len(local)])
                offset += len(local)
        for key, table in lowdim.items():
            if key != ACTION:
                torch.index_select(table, 0, rows, out=out[key])
        windows, is_pad = action_windows(rows, episode_end, self.chunk_size)
        action = lowdim[ACTION]
        torch.index_select(action, 0, windows.flatten(), out=out[ACTION].view(-1, action.shape[1]))
        out[ACTION_IS_PAD].copy_(is_pad)
        return out

    def gather(self, pieces: Sequence[tuple[Block, np.ndarray]], out: Batch | None = None,
               views: np.ndarray | None = None) -> Batch:
        """One batch from ``(block, rows)`` pieces, in order: index arithmetic only.

        The blocks are host blocks, or the resident one when the features live on the device (the
        batch is then gathered there). Written into ``out`` when given, else into new buffers
        (pinned when they go to a GPU). ``views``: each row's view (default view 0).
        """
        lowdim, episode_end, device = self.lowdim, self.episode_end, torch.device("cpu")
        if self._device_tables is not None:
            _, lowdim, episode_end = self._device_tables
            device = self.device
        rows = torch.from_numpy(np.concatenate([r for _, r in pieces])).to(device)
        if out is None:
            out = self.batch_buffers(len(rows), device, pin=self.pin_memory)
        parts = [(block, torch.from_numpy(block.local(part)).to(device)) for block, part in pieces]
        return self._fill(out, parts, rows, lowdim, episode_end, None if views is None else torch.from_numpy(views).to(device))

    @staticmethod
    def _cut(pieces: Iterator[tuple[Block, Any]], batch_size: int) -> Iterator[list[tuple[Block, Any]]]:
        """Cut a stream of ``(block, rows)`` into lists of pieces of ``batch_size`` rows (the last may be short).

        ``rows`` may be arrays or tensors: only ``len`` and slicing are used.
        """
        pending: list[tuple[Block, Any]] = []
        held = 0
        for block, rows in pieces:
            while len(rows):
                take = min(batch_size - held, len(rows))
                pending.append((block, rows[:take]))
                held += take
                rows = rows[take:]
                if held == batch_size:
                    yield pending
                    pending, held = [], 0
        if held:
            yield pending

    def _loaded(self, pieces: Iterator[tuple[np.ndarray | None, np.ndarray]]) -> Iterator[tuple[Block, np.ndarray]]:
        """Attach features to each piece, reading the next piece's chunks while this one is used."""
        if self.resident is not None:
            yield from ((self.resident, rows) for _, rows in pieces)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dinocache-readahead") as pool:
            current = None
            for chunks, rows in pieces:
                future = pool.submit(self.load_chunks, chunks), rows
                if current is not None:
                    yield current[0].result(), current[1]
                current = future
            if current is not None:
                yield current[0].result(), current[1]

    def sample_order(self, rows: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> SampleOrder:
        """How this rank visits ``rows``: single frames in memory, chunk windows when streaming."""
        if self.in_memory:
            return SampleOrder(rows, seed, rank, world_size)
        return SampleOrder(rows, seed, rank, world_size, self.chunk_frames, self.window_chunks)

    def _batches(self, pieces: Iterator[tuple[np.ndarray | None, np.ndarray]], batch_size: int, out: Batch,
                 prefetch: int, draw: ViewDraw | None = None) -> DeviceBatches:
        """Batches of ``pieces`` written into ``out`` on the device, however the features are held;
        each sample's view from ``draw`` (None: view 0)."""
        if self.on_device:
            return ResidentBatches(self, pieces, batch_size, out, draw)
        ring = [self.batch_buffers(batch_size, pin=self.pin_memory) for _ in range(prefetch + 2)]
        host = (self.gather(piece, out=ring[i % len(ring)],
                            views=None if draw is None else draw.take(sum(len(rows) for _, rows in piece)))
                for i, piece in enumerate(self._cut(self._loaded(pieces), batch_size)))
        return HostBatches(BatchStream(host, prefetch), out)

    def train_batches(self, order: SampleOrder, batch_size: int, position: int = 0, out: Batch | None = None,
                      prefetch: int = 4) -> DeviceBatches:
        """Endless training batches of ``order`` on the device, skipping the first ``position`` samples.

        Every batch is written into ``out`` (default: new buffers on the device) and ``out`` is
        returned: a step captured as a CUDA graph reads its inputs from fixed addresses. With features
        on the device, the batch is gathered there from index tensors; otherwise a background thread
        gathers batches ahead on the host (see :class:`HostBatches`). With views, each sample draws one
        (:class:`~dinocache.policy.training.feature_augment.ViewDraw`, from ``position`` on).
        """
        out = self.batch_buffers(batch_size, self.device) if out is None else out
        draw = ViewDraw(self.views, order.seed, order.rank, position) if self.views > 1 else None
        return self._batches(order.pieces(position), batch_size, out, prefetch, draw)

    def validation_batches(self, rows: np.ndarray, out: Batch) -> Iterator[Batch]:
        """Batches of ``rows`` in order, each written into ``out`` and of its size (the shapes a graph needs).

        The last batch is completed with copies of the last row, marked as padding in ``action_is_pad``,
        so that they count in no loss.
        """
        batch_size, rows = len(out[ACTION]), np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        padded = np.concatenate([rows, np.full(-len(rows) % batch_size, rows[-1])])
        pieces: Iterator[tuple[np.ndarray | None, np.ndarray]]
        if self.on_device:
            pieces = iter([(None, padded)])
        else:  # whole chunks, a window at a time
            chunk_of_row = padded // self.chunk_frames
            chunks = np.unique(chunk_of_row)
            windows = [chunks[w:w + self.window_chunks] for w in range(0, len(chunks), self.window_chunks)]
            pieces = iter([(members, padded[np.isin(chunk_of_row, members)]) for members in windows])
        with self._batches(pieces, batch_size, out, prefetch=2) as batches:
            for index, batch in enumerate(batches):
                real = len(rows) - index * batch_size
                if real < batch_size:
                    batch[ACTION_IS_PAD][real:] = True
                yield batch

    def ordered_batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Batches of ``rows`` in order, gathered on the host (new buffers each); the last may be short."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.resident is not None:
            return (self.gather(p) for p in self._cut(iter([(self.resident, rows)]), batch_size))
        chunk_of_row = rows // self.chunk_frames
        chunks = np.unique(chunk_of_row)
        pieces = []
        for w in range(0, len(chunks), self.window_chunks):
            members = chunks[w:w + self.window_chunks]
            pieces.append((members, rows[np.isin(chunk_of_row, members)]))
        return (self.gather(p) for p in self._cut(self._loaded(iter(pieces)), batch_size))


class ResidentBatches(DeviceBatches):
    """Features on the training device: each batch is a handful of ``index_select`` kernels there.

    The sampler's rows go to the device once per piece (an epoch, in memory); a batch is then a slice
    of them, so a step costs the host no more than launching the gathers, and never waits.
    """

    def __init__(self, data: CachedFeatures, pieces: Iterator[tuple[np.ndarray | None, np.ndarray]],
                 batch_size: int, out: Batch, draw: ViewDraw | None = None) -> None:
        super().__init__(out)
        assert data._device_tables is not None
        self._data, self._draw = data, draw
        self._block, self._lowdim, self._episode_end = data._device_tables
        self._cuts = data._cut(((self._block, self._upload(rows)) for _, rows in pieces), batch_size)

    def _upload(self, rows: np.ndarray) -> Tensor:
        index = torch.from_numpy(rows)
        if self._data.device.type == "cuda":  # pinned, so the copy is asynchronous
            index = index.pin_memory()
        return index.to(self._data.device, non_blocking=True)

    def __next__(self) -> Batch:
        parts = next(self._cuts)
        rows = torch.cat([r for _, r in parts]) if len(parts) > 1 else parts[0][1]
        views = None if self._draw is None else self._upload(self._draw.take(len(rows)))
        return self._data._fill(self.out, [(self._block, rows)], rows, self._lowdim, self._episode_end, views)

