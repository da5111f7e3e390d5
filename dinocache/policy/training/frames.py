"""Training batches with camera frames instead of cached features: the online data path, in one place.

Cached training reads feature grids (:class:`~dinocache.policy.training.data.CachedFeatures`). Training with
the backbone in the step (ACT's own recipe, ``dinocache train --online``) or fine-tuning it from a
cached warm start (``dinocache finetune``) needs the frames themselves, decoded from the dataset.
:class:`DecodedFrames` provides them with the very interface the training loop uses for cached
features (``batch_buffers``, ``sample_order``, ``train_batches``, ``validation_batches``), and
everything else identical: the same :class:`~dinocache.policy.model.normalize.Normalizer`, the same
``action_windows``, the same :class:`~dinocache.policy.training.sampling.SampleOrder`, so the same rows in the
same order as a cached run with the same seed.

Decoding runs ahead of the step: a background thread (:class:`~dinocache.policy.training.batches.BatchStream`)
assembles the next batches while the step computes, and the episodes a batch needs are decoded in
parallel by a thread pool (PyAV and the image decoders release the GIL). A decoded episode is kept
in an LRU cache while it fits ``cache_bytes``, so a dataset that fits in RAM is decoded once; one
that does not is decoded an episode at a time, as it is visited. Frames are uint8 ``(B, H, W, 3)``
at the camera's native size under ``observation.images.<camera>`` (the head's camera names); the
backbone's own preprocessing resizes them, as in the exported policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from dinocache.datasets import open_dataset
from dinocache.datasets.base import DatasetSource
from dinocache.datasets.rows import DECODE_THREADS, EpisodeFrames
from dinocache.devices import available_memory
from dinocache.errors import DatasetError
from dinocache.keys import ACTION, ACTION_IS_PAD, OBS_ENV_STATE, OBS_STATE, camera_key, short_name
from dinocache.pipeline.store import FeatureStore, lowdim_stats
from dinocache.policy.model.normalize import Normalizer
from dinocache.policy.training.batches import Batch, BatchStream, HostBatches
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import action_windows
from dinocache.policy.training.sampling import SampleOrder

__all__ = ["DecodedFrames"]

#: Share of MemAvailable the decoded-episode cache may take by default.
DEFAULT_CACHE_SHARE = 0.25

Episodes = list[tuple[int, int, int, str]]  # (index, start row, length, task), as FeatureStore.episodes()


class DecodedFrames:
    """Normalised low-dim arrays and decoded frames of every row: batches for a backbone in the step.

    Build it with :meth:`from_store` (the rows, statistics and cameras of a feature store, frames
    from the dataset it was extracted from) or :meth:`from_dataset` (a dataset alone, statistics
    computed exactly as extraction computes them). Attributes mirror
    :class:`~dinocache.policy.training.data.CachedFeatures`: ``stats``, ``normalizer``, ``lowdim`` (normalised,
    indexed by row), ``episode_end``, ``episodes``, ``camera_keys`` (head camera -> dataset key),
    ``chunk_size``, ``raw`` (as recorded); ``in_memory`` is True (frames are sampled one by one, not by store chunk).
    """

    in_memory = True
    window_chunks = None

    def __init__(self, source: DatasetSource, episodes: Episodes, cameras: Sequence[str], raw: dict[str, np.ndarray],
                 stats: dict[str, dict[str, np.ndarray]], chunk_size: int, device: str | torch.device = "cpu",
                 cache_bytes: int | None = None, decode_threads: int = DECODE_THREADS) -> None:
        self.source, self.episodes, self.chunk_size = source, episodes, chunk_size
        self.device = torch.device(device)
        self.stats = stats
        self.normalizer = Normalizer(stats)
        #: Low-dim arrays as recorded, ``(rows, dim)`` float32 (what a live policy is given), and normalised.
        self.raw = {key: np.asarray(values, np.float32).reshape(len(values), -1) for key, values in raw.items()}
        self.lowdim = {key: self.normalizer.normalize(key, torch.from_numpy(values))
                       for key, values in self.raw.items()}
        num_frames = sum(length for _, _, length, _ in episodes)
        ends = np.zeros(num_frames, dtype=np.int64)
        for _, start, length, _ in episodes:
            ends[start:start + length] = start + length
        self.episode_end = torch.from_numpy(ends)
        self.camera_keys = {short_name(camera): camera for camera in cameras}
        self.sizes = {camera: (source.cameras[camera].height, source.cameras[camera].width) for camera in cameras}
        budget = int(DEFAULT_CACHE_SHARE * available_memory()) if cache_bytes is None else cache_bytes
        self.frames = EpisodeFrames(source, episodes, cameras, budget, decode_threads)

    @classmethod
    def from_store(cls, store: FeatureStore, dataset: str | Path | None, chunk_size: int,
                   device: str | torch.device = "cpu", **options: int) -> DecodedFrames:
        """The store's rows, normalisation and cameras; frames from ``dataset`` (default: the recorded
        source), which must be the dataset the store was extracted from (same fingerprint)."""
        try:
            source = store.open_source(dataset)
        except DatasetError as err:
            raise DatasetError(f"the frames come from the dataset the store was extracted from: {err}; "
                               "pass --dataset PATH") from None
        keys = [key for key in (OBS_STATE, ACTION, OBS_ENV_STATE) if key in store.lowdim_keys]
        raw = {key: store.read(key) for key in keys}
        return cls(source, store.episodes(), store.cameras, raw, {key: store.stats(key) for key in keys}, chunk_size,
                   device, **options)

    @classmethod
    def from_dataset(cls, dataset: str | Path, chunk_size: int, cameras: Sequence[str] | None = None,
                     device: str | torch.device = "cpu", **options: int) -> DecodedFrames:
        """Every episode of ``dataset``, its state and action statistics computed over all of them
        (``options``: ``cache_bytes``, ``decode_threads``)."""
        source = open_dataset(dataset)
        keys = [key for key in (OBS_STATE, ACTION, OBS_ENV_STATE) if key in source.lowdim]
        if OBS_STATE not in keys or ACTION not in keys:
            raise DatasetError(f"{source.path}: the ACT head needs {OBS_STATE!r} and {ACTION!r}; the dataset has "
                               f"{', '.join(source.lowdim) or 'neither'}")
        parts = {key: [] for key in keys}
        for episode in source.episodes:
            arrays = source.read_lowdim(episode.index)
            for key in keys:
                parts[key].append(np.asarray(arrays[key], np.float32).reshape(episode.length, -1))
        raw = {key: np.concatenate(values) for key, values in parts.items()}
        episodes = [(ep.index, ep.start, ep.length, ep.task) for ep in source.episodes]
        return cls(source, episodes, source.select_cameras(cameras), raw,
                   {key: lowdim_stats(values) for key, values in raw.items()}, chunk_size, device, **options)

    @property
    def state_dim(self) -> int:
        return self.lowdim[OBS_STATE].shape[1]

    @property
    def action_dim(self) -> int:
        return self.lowdim[ACTION].shape[1]

    @property
    def env_state_dim(self) -> int | None:
        return self.lowdim[OBS_ENV_STATE].shape[1] if OBS_ENV_STATE in self.lowdim else None

    def gather(self, rows: np.ndarray) -> Batch:
        """The batch of ``rows``: decoded frames, normalised state, action windows and their padding."""
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        frames = self.frames(index.numpy())
        batch = {camera_key(name): torch.from_numpy(frames[camera]) for name, camera in self.camera_keys.items()}
        for key, table in self.lowdim.items():
            if key != ACTION:
                batch[key] = table.index_select(0, index)
        windows, batch[ACTION_IS_PAD] = action_windows(index, self.episode_end, self.chunk_size)
        batch[ACTION] = self.lowdim[ACTION][windows]
        return batch

    def batch_buffers(self, batch_size: int, device: str | torch.device = "cpu") -> Batch:
        """Empty tensors for one batch on ``device``, shaped as :meth:`gather` returns it."""
        like = self.gather(np.zeros(1, dtype=np.int64))
        return {key: torch.empty((batch_size, *value.shape[1:]), dtype=value.dtype, device=device)
                for key, value in like.items()}

    def sample_order(self, rows: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> SampleOrder:
        """Single frames shuffled per epoch: the order a cached run in memory has with the same seed."""
        return SampleOrder(rows, seed, rank, world_size)

    def _batches(self, rows: Iterator[np.ndarray], out: Batch, prefetch: int) -> HostBatches:
        return HostBatches(BatchStream((self.gather(r) for r in rows), prefetch), out)

    def train_batches(self, order: SampleOrder, batch_size: int, position: int = 0, out: Batch | None = None,
                      prefetch: int = 4) -> HostBatches:
        """Endless batches of ``order`` (after the first ``position`` samples), decoded ahead, written into ``out``."""
        out = self.batch_buffers(batch_size, self.device) if out is None else out
        cuts = CachedFeatures._cut(((None, rows) for _, rows in order.pieces(position)), batch_size)
        return self._batches((np.concatenate([rows for _, rows in cut]) for cut in cuts), out, prefetch)

    def validation_batches(self, rows: np.ndarray, out: Batch) -> Iterator[Batch]:
        """Batches of ``rows`` in order, each of ``out``'s size (the last completed with masked copies)."""
        batch_size, rows = len(out[ACTION]), np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        padded = np.concatenate([rows, np.full(-len(rows) % batch_size, rows[-1])])
        with self._batches(iter(np.split(padded, len(padded) // batch_size)), out, prefetch=2) as batches:
            for index, batch in enumerate(batches):
                real = len(rows) - index * batch_size
                if real < batch_size:
                    batch[ACTION_IS_PAD][real:] = True
                yield batch
