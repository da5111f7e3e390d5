"""The reader contract: what every dataset format looks like to the rest of dinocache.

Stage 1 (`dinocache extract`) never touches a file format directly. It opens a dataset with
:func:`dinocache.datasets.open_dataset` and gets a :class:`DatasetSource` that lists
episodes, cameras and low-dimensional features under LeRobot-style keys (``observation.state``,
``action``, ``observation.images.<cam>``) whatever the format on disk, reads low-dimensional
arrays per episode and streams uint8 RGB frames per episode and camera in batches.

Every problem a user can cause is a :class:`~dinocache.errors.DatasetError` whose one-line
message names the file, the episode and what is wrong (see :func:`problem`). Episodes that are
bad in a way that is cheap to see (missing video, length 0, NaN in a state) are found when the
dataset is opened, so that ``skip_bad_episodes`` can drop them *before* the extractor lays out
its store; problems only decoding can reveal (a video shorter than its parquet) surface when
the frames are read: as an :class:`~dinocache.errors.EpisodeError` where the caller reads through
:func:`reading_episode`, so that the extractor can still leave that episode out
(:meth:`DatasetSource.drop_episode`).
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinocache.errors import DatasetError, EpisodeError
from dinocache.hashing import file_sha256
from dinocache.keys import short_name

#: The formats :func:`open_dataset` knows, in the spelling ``--format`` takes.
FORMATS: tuple[str, ...] = ("lerobot-v2.1", "lerobot-v3.0", "aloha-hdf5")


@dataclass(frozen=True)
class EpisodeInfo:
    """One episode that can be read.

    ``start`` is the global index of the episode's first frame when the listed episodes are laid
    end to end in ascending ``index`` order; skipped episodes take no room, so the listed
    episodes tile ``[0, num_frames)`` without gaps.
    """

    index: int
    length: int
    task: str
    start: int


@dataclass(frozen=True)
class CameraInfo:
    """A camera stream: its key (``observation.images.<cam>``) and the decoded frame size."""

    name: str
    height: int
    width: int


@dataclass(frozen=True)
class LowDimInfo:
    """A float feature stored per frame, e.g. ``observation.state`` of shape ``(26,)``.

    ``names`` are the per-dimension labels when the dataset gives a consistent list of them
    (nested lists and ``{"motors": [...]}`` dicts are flattened), else ``None``.
    """

    name: str
    shape: tuple[int, ...]
    names: list[str] | None


def problem(file: Path | str, episode: int | None, what: str) -> str:
    """The one-line message every reader error uses: ``<file>: episode <n>: <what>``."""
    if episode is None:
        return f"{file}: {what}"
    return f"{file}: episode {episode}: {what}"


@contextlib.contextmanager
def reading_episode(episode: int, camera: str) -> Iterator[None]:
    """Around the reading of one episode's frames: a reader's :class:`DatasetError` becomes an
    :class:`EpisodeError` saying which episode and camera it is about (the message unchanged)."""
    try:
        yield
    except EpisodeError:
        raise
    except DatasetError as err:
        raise EpisodeError(str(err), episode, camera) from None


def _end_to_end(episodes: Iterable[tuple[int, int, str]]) -> list[EpisodeInfo]:
    """``(index, length, task)`` in order as :class:`EpisodeInfo` laid end to end from frame 0."""
    laid, start = [], 0
    for index, length, task in episodes:
        laid.append(EpisodeInfo(index=index, length=length, task=task, start=start))
        start += length
    return laid


def first_nonfinite(array: np.ndarray) -> tuple[int, str] | None:
    """Return ``(frame, 'NaN' | 'inf')`` for the first frame holding a non-finite value, else None.

    Only the first offending frame is reported: it is what a user needs to find the bad rows,
    and a full list would not fit in one line.
    """
    flat = array.reshape(len(array), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if not bad.any():
        return None
    frame = int(np.argmax(bad))
    kind = "NaN" if np.isnan(flat[frame]).any() else "inf"
    return frame, kind


class EpisodeBook:
    """Collects the episodes found while opening a dataset and the problems of the bad ones.

    Readers add every episode they find, with a problem string when it is unusable; ``finish``
    then either raises the first problem (the default: a dataset with a bad episode is an error)
    or drops the bad episodes into ``skipped`` and numbers the good ones contiguously.
    """

    def __init__(self, dataset: Path) -> None:
        self._dataset = dataset
        self._found: dict[int, tuple[int, str]] = {}
        self._problems: dict[int, str] = {}

    def add(self, index: int, length: int, task: str) -> None:
        self._found[index] = (length, task)

    def knows(self, index: int) -> bool:
        return index in self._found

    def lengths(self) -> dict[int, int]:
        """Declared length of every episode found so far, bad ones included."""
        return {index: length for index, (length, _) in self._found.items()}

    def bad(self, index: int, message: str) -> None:
        """Mark an episode as unusable; the first problem found for an episode is the one kept."""
        self._problems.setdefault(index, message)

    def is_bad(self, index: int) -> bool:
        return index in self._problems

    def finish(self, skip_bad_episodes: bool) -> tuple[list[EpisodeInfo], list[tuple[int, str]]]:
        if not self._found:
            raise DatasetError(problem(self._dataset, None, "the dataset lists no episodes"))
        if self._problems and not skip_bad_episodes:
            first = min(self._problems)
            raise DatasetError(self._problems[first])
        episodes = _end_to_end((index, *self._found[index]) for index in sorted(self._found)
                               if index not in self._problems)
        skipped = [(index, self._problems[index]) for index in sorted(self._problems)]
        if not episodes:
            raise DatasetError(problem(
                self._dataset, None,
                f"all {len(self._found)} episodes are bad; the first: {skipped[0][1]}"))
        return episodes, skipped


class DatasetSource(ABC):
    """An opened, validated dataset. Subclasses fill the attributes in their constructor.

    Attributes:
        path: the dataset folder.
        format: one of :data:`FORMATS`.
        fps: frames per second of every stream.
        cameras: camera key -> :class:`CameraInfo`, in the dataset's order.
        lowdim: float feature key -> :class:`LowDimInfo`, in the dataset's order.
        episodes: the readable episodes, ascending index, with contiguous ``start``.
        skipped: ``(episode_index, message)`` for each episode dropped by ``skip_bad_episodes``.
    """

    format: str
    path: Path
    fps: float
    cameras: dict[str, CameraInfo]
    lowdim: dict[str, LowDimInfo]
    episodes: list[EpisodeInfo]
    skipped: list[tuple[int, str]]

    #: Files hashed whole by :meth:`fingerprint` (small metadata files).
    _meta_files: list[Path]
    #: Data files (parquet / hdf5) -> digest of the low-dimensional bytes read from them.
    _lowdim_digests: dict[Path, str]
    #: Video files, fingerprinted by name and size only.
    _video_files: list[Path]

    # ----------------------------------------------------------------------------- lookup --
    @property
    def num_frames(self) -> int:
        """Total frames over the listed (not skipped) episodes."""
        return sum(ep.length for ep in self.episodes)

    def episode(self, episode_index: int) -> EpisodeInfo:
        """The listed episode with this index; a skipped or unknown index is a DatasetError."""
        found = self._episode_map().get(episode_index)
        if found is None:
            reason = dict(self.skipped).get(episode_index)
            if reason is not None:
                raise DatasetError(problem(self.path, episode_index, f"was skipped: {reason}"))
            known = ", ".join(str(e.index) for e in self.episodes[:20])
            more = ", ..." if len(self.episodes) > 20 else ""
            raise DatasetError(problem(
                self.path, episode_index, f"no such episode; episodes: {known}{more}"))
        return found

    def drop_episode(self, episode_index: int, reason: str) -> None:
        """Leave out an episode found bad after opening (a frame damaged, found while decoding) as
        ``skip_bad_episodes`` leaves out one found bad when opening: gone from ``episodes`` (the rest
        laid end to end again) and from the fingerprint, listed in ``skipped`` with ``reason``."""
        self.episode(episode_index)  # a listed episode, or one clear error
        kept = [(ep.index, ep.length, ep.task) for ep in self.episodes if ep.index != episode_index]
        if not kept:
            raise DatasetError(problem(self.path, None, f"every episode is bad; the last found: {reason}"))
        self.episodes = _end_to_end(kept)
        self.skipped = sorted([*self.skipped, (episode_index, reason)])

    def _episode_map(self) -> dict[int, EpisodeInfo]:
        # Keyed on the list object so that a caller replacing ``episodes`` is still honoured.
        cached = getattr(self, "_episodes_by_index", None)
        if cached is None or cached[0] is not self.episodes:
            cached = (self.episodes, {ep.index: ep for ep in self.episodes})
            self._episodes_by_index = cached
        return cached[1]

    def camera(self, name: str) -> CameraInfo:
        """Resolve a camera by key (``observation.images.top``) or short name (``top``)."""
        return self.cameras[self.select_cameras([name])[0]]

    def select_cameras(self, names: Iterable[str] | None) -> list[str]:
        """Validate camera names and return their full keys, in the order given.

        ``None`` means every camera. A name may be the full key or its last dotted component
        (``cam_high`` for ``observation.images.cam_high``); an unknown or ambiguous name is a
        DatasetError listing the cameras that exist.
        """
        if names is None:
            return list(self.cameras)
        keys: list[str] = []
        for name in names:
            if name in self.cameras:
                key = name
            else:
                matches = [k for k in self.cameras if short_name(k) == name]
                if len(matches) != 1:
                    existing = ", ".join(self.cameras) or "(none)"
                    what = "is ambiguous" if matches else "does not exist"
                    raise DatasetError(problem(
                        self.path, None, f"camera '{name}' {what}; cameras: {existing}"))
                key = matches[0]
            if key not in keys:
                keys.append(key)
        return keys

    # ------------------------------------------------------------------------------ reads --
    @abstractmethod
    def read_lowdim(self, episode_index: int) -> dict[str, np.ndarray]:
        """Low-dimensional arrays of one episode.

        Returns float32 ``(T, *shape)`` per key of :attr:`lowdim`, plus int64 ``frame_index``
        ``(T,)`` and float32 ``timestamp`` ``(T,)`` (seconds from the episode's start).
        """

    @abstractmethod
    def iter_frames(self, episode_index: int, camera: str,
                    batch_size: int = 32, decoder_threads: int = 0) -> Iterator[np.ndarray]:
        """Yield uint8 ``(b, H, W, 3)`` RGB batches of one episode and camera, in frame order.

        The episode's video is decoded once, sequentially (one seek at most, to the episode's
        start inside a shared video file), with the decoder's own frame threading:
        ``decoder_threads`` of them, or FFmpeg's choice (one per core) for 0; sources of still
        images ignore it. The frame count and each frame's timestamp are checked against the
        parquet rows; a mismatch is a DatasetError raised before the final batch is yielded.
        """

    def read_frames(self, episode_index: int, camera: str) -> np.ndarray:
        """All frames of one episode and camera as one uint8 ``(T, H, W, 3)`` array."""
        ep = self.episode(episode_index)
        cam = self.camera(camera)
        out = np.empty((ep.length, cam.height, cam.width, 3), dtype=np.uint8)
        filled = 0
        for batch in self.iter_frames(episode_index, cam.name, batch_size=64):
            out[filled:filled + len(batch)] = batch
            filled += len(batch)
        return out

    # ------------------------------------------------------------------------ fingerprint --
    def fingerprint(self) -> str:
        """A sha256 hex digest that changes when the dataset's content changes.

        It covers, in a fixed order: the format and fps; the bytes of every metadata file
        (``meta/*`` for LeRobot, the sidecar for ALOHA); for every data file (parquet / hdf5)
        its path relative to the dataset, its size and a sha256 of the low-dimensional arrays
        read from it (computed while the dataset was opened, so this call reads nothing big);
        for every video file its relative path and size (videos are not hashed: hashing
        terabytes of mp4 would cost more than the extraction it guards); and the indices of the
        listed episodes, so that skipping a bad episode changes the fingerprint.
        """
        h = hashlib.sha256()

        def line(*parts: object) -> None:
            h.update(("\t".join(str(p) for p in parts) + "\n").encode())

        line("dinocache-dataset", 1, self.format, repr(float(self.fps)))
        for file in sorted(self._meta_files):
            line("meta", self._rel(file), file_sha256(file))
        for file in sorted(self._lowdim_digests):
            line("data", self._rel(file), file.stat().st_size, self._lowdim_digests[file])
        for file in sorted(set(self._video_files)):
            line("video", self._rel(file), file.stat().st_size)
        line("episodes", ",".join(str(ep.index) for ep in self.episodes))
        return h.hexdigest()

    def _rel(self, file: Path) -> str:
        try:
            return file.relative_to(self.path).as_posix()
        except ValueError:
            return file.as_posix()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, format={self.format!r}, "
                f"episodes={len(self.episodes)}, frames={self.num_frames}, "
                f"cameras={list(self.cameras)}, skipped={len(self.skipped)})")


def lowdim_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the dtype, shape and bytes of arrays, in order (for :meth:`fingerprint`)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
