"""ALOHA / ACT HDF5: a folder of ``episode_<n>.hdf5``, one file per episode.

Layout (as written by ACT's sim scripts and ALOHA's ``record_episodes.py``)::

    /observations/images/<cam>   (T, H, W, 3) uint8          raw frames, or
                                 (T, L) uint8                JPEG bytes zero-padded to L
    /observations/qpos           (T, D)  -> observation.state
    /observations/qvel           (T, D)  -> observation.velocity   (if present)
    /observations/effort         (T, D)  -> observation.effort     (if present)
    /action                      (T, A)  -> action
    /compress_len                (num_cams, T)                     (compressed files only)
    attrs: sim (bool), compress (bool, compressed files only)

Cameras are exposed as ``observation.images.<cam>`` like LeRobot's, so the rest of dinocache
sees one naming whatever the format. The files carry no frame rate: ALOHA records at 50 Hz,
which is the default; a ``dinocache.json`` sidecar (``{"fps": 30, "task": "..."}``) or the
``fps`` argument overrides it. The task is the sidecar's, else the folder's name.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dinocache.errors import DatasetError
from dinocache.keys import ACTION, CAMERA_PREFIX, OBS_STATE, OBS_VELOCITY
from dinocache.datasets.base import (
    CameraInfo, DatasetSource, EpisodeBook, LowDimInfo, first_nonfinite,
    lowdim_digest, problem)
from dinocache.datasets.images import (
    ImageDecodeError, decode_jpeg_opencv_order, decode_many)

ALOHA_FPS = 50.0
SIDECAR = "dinocache.json"
EPISODE_FILE = re.compile(r"^episode_(\d+)\.hdf5$")
IMAGES_GROUP = "/observations/images"
#: HDF5 dataset -> exposed low-dimensional key, in the order they are listed.
LOWDIM_DATASETS: dict[str, str] = {
    "/observations/qpos": OBS_STATE,
    "/observations/qvel": OBS_VELOCITY,
    "/observations/effort": "observation.effort",
    "/action": ACTION,
}
REQUIRED_DATASETS = ("/observations/qpos", "/action")


def episode_files(folder: Path) -> dict[int, Path]:
    """``episode_<n>.hdf5`` files of a folder by episode number (used for format detection)."""
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for file in folder.iterdir():
        match = EPISODE_FILE.match(file.name)
        if match and file.is_file():
            index = int(match.group(1))
            if index in found:
                raise DatasetError(problem(file, index, f"has the same episode number as "
                                                        f"{found[index].name}"))
            found[index] = file
    return dict(sorted(found.items()))


def _episode_length(root: h5py.File, images: h5py.Group) -> tuple[int, str | None]:
    """The episode's frame count, and which per-frame arrays disagree with it (or None).

    Every camera, ``qpos`` and ``action`` hold one row per frame. The length most of them share is
    the episode's, so that a short ``/action`` is named as what is short, not blamed on the cameras.
    """
    lengths = {name: root[name].shape[0] if root[name].ndim else 0 for name in REQUIRED_DATASETS}
    lengths.update({f"{IMAGES_GROUP}/{name}": ds.shape[0] if ds.ndim else 0
                    for name, ds in images.items() if isinstance(ds, h5py.Dataset)})
    length = Counter(lengths.values()).most_common(1)[0][0]
    odd = [f"{name} has {n} rows" for name, n in lengths.items() if n != length]
    if not odd:
        return int(length), None
    agree = [name for name, n in lengths.items() if n == length]
    return int(length), f"{', '.join(odd)} but {' and '.join(agree)} have {length}: one row per frame is needed"


@dataclass(frozen=True)
class _Layout:
    """What every episode file must contain, taken from the first readable one."""

    cameras: dict[str, str]  # exposed key -> hdf5 dataset name under IMAGES_GROUP
    compressed: bool
    lowdim: dict[str, str]  # exposed key -> hdf5 path
    lowdim_shapes: dict[str, tuple[int, ...]]


class AlohaHdf5Source(DatasetSource):
    """An ALOHA / ACT HDF5 episode folder, raw or JPEG-compressed frames."""

    format = "aloha-hdf5"

    def __init__(self, path: Path, skip_bad_episodes: bool = False,
                 fps: float | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        files = episode_files(self.path)
        if not files:
            raise DatasetError(problem(self.path, None, "has no episode_<n>.hdf5 files"))
        sidecar = self._read_sidecar()
        chosen = fps if fps is not None else sidecar.get("fps", ALOHA_FPS)
        if not isinstance(chosen, (int, float)) or not chosen > 0:
            raise DatasetError(problem(self.path / SIDECAR, None,
                                       f"'fps' must be a positive number, got {chosen!r}"))
        self.fps = float(chosen)
        task = str(sidecar.get("task", self.path.name))
        self._files = files
        self._meta_files = [self.path / SIDECAR] if (self.path / SIDECAR).is_file() else []
        self._lowdim_digests = {}
        self._video_files = []

        book = EpisodeBook(self.path)
        self._layout: _Layout | None = None
        for index, file in files.items():
            length, bad = self._check_episode(file, index)
            book.add(index, length, task)
            if bad is not None:
                book.bad(index, problem(file, index, bad))
        if self._layout is None:  # no file could be read at all
            self.cameras, self.lowdim = {}, {}
        self.episodes, self.skipped = book.finish(skip_bad_episodes)

    # ------------------------------------------------------------------------- opening --
    def _read_sidecar(self) -> dict:
        file = self.path / SIDECAR
        if not file.is_file():
            return {}
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(problem(file, None, f"cannot parse JSON ({err})")) from None
        if not isinstance(data, dict):
            raise DatasetError(problem(file, None, "is not a JSON object"))
        return data

    def _check_episode(self, file: Path, index: int) -> tuple[int, str | None]:
        """``(length, problem or None)`` for one file; the first good file defines the layout."""
        try:
            with h5py.File(file, "r") as root:
                return self._check_open_episode(root, file, index)
        except OSError as err:
            return 0, f"cannot open HDF5 ({err})"

    def _check_open_episode(self, root: h5py.File, file: Path, index: int
                            ) -> tuple[int, str | None]:
        for name in REQUIRED_DATASETS:
            if not isinstance(root.get(name), h5py.Dataset):
                return 0, f"has no dataset {name}"
        images = root.get(IMAGES_GROUP)
        if not isinstance(images, h5py.Group) or not len(images):
            return 0, f"has no camera under {IMAGES_GROUP}"
        length, uneven = _episode_length(root, images)
        if uneven is not None:
            return length, uneven
        if length == 0:
            return 0, "has length 0 (no frames)"

        if self._layout is None:
            layout = self._make_layout(root, file, index)
            if isinstance(layout, str):
                return length, layout
            self._layout = layout
        layout = self._layout

        present = {CAMERA_PREFIX + name for name in images}
        if present != set(layout.cameras):
            return length, (f"has cameras {sorted(present)}, the first episode has "
                            f"{sorted(layout.cameras)}")
        for key, name in layout.cameras.items():
            ds = images[name]
            if ds.dtype != np.uint8 or ds.shape[0] != length:
                return length, (f"camera '{key}' is {ds.dtype} {ds.shape}, expected uint8 with "
                                f"{length} frames")
            if layout.compressed != (ds.ndim == 2):
                return length, f"camera '{key}' is {'not ' if layout.compressed else ''}compressed"
            if not layout.compressed:
                cam = self.cameras[key]
                if ds.shape[1:] != (cam.height, cam.width, 3):
                    return length, (f"camera '{key}' frames are {ds.shape[1:]}, the first "
                                    f"episode's are {(cam.height, cam.width, 3)}")

        arrays = []
        for key, name in layout.lowdim.items():
            ds = root.get(name)
            if not isinstance(ds, h5py.Dataset):
                return length, f"has no dataset {name}"
            if ds.shape != (length, *layout.lowdim_shapes[key]):
                return length, (f"{name} has shape {ds.shape}, expected "
                                f"{(length, *layout.lowdim_shapes[key])}")
            values = ds[()]
            bad = first_nonfinite(values.astype(np.float64))
            if bad is not None:
                return length, f"{name} ('{key}') contains {bad[1]} at frame {bad[0]}"
            arrays.append(values)
        self._lowdim_digests[file] = lowdim_digest(arrays)
        return length, None

    def _make_layout(self, root: h5py.File, file: Path, index: int) -> _Layout | str:
        images = root[IMAGES_GROUP]
        cameras = {CAMERA_PREFIX + name: name for name in images}
        compressed = any(images[name].ndim == 2 for name in images)
        self.cameras = {}
        for key, name in cameras.items():
            ds = images[name]
            if compressed:
                try:
                    first = decode_jpeg_opencv_order(ds[0])
                except ImageDecodeError as err:
                    return f"camera '{key}': frame 0 does not decode as JPEG ({err})"
                height, width = first.shape[:2]
            elif ds.ndim == 4 and ds.shape[-1] == 3:
                height, width = ds.shape[1:3]
            else:
                return f"camera '{key}' has shape {ds.shape}, expected (T, H, W, 3) or (T, bytes)"
            self.cameras[key] = CameraInfo(name=key, height=int(height), width=int(width))
        lowdim = {key: name for name, key in LOWDIM_DATASETS.items()
                  if isinstance(root.get(name), h5py.Dataset)}
        shapes = {key: tuple(root[name].shape[1:]) for key, name in lowdim.items()}
        self.lowdim = {key: LowDimInfo(name=key, shape=shapes[key], names=None) for key in lowdim}
        return _Layout(cameras=cameras, compressed=compressed, lowdim=lowdim,
                       lowdim_shapes=shapes)

    # ------------------------------------------------------------------------- reading --
    def read_lowdim(self, episode_index: int) -> dict[str, np.ndarray]:
        ep = self.episode(episode_index)
        file = self._files[ep.index]
        assert self._layout is not None
        try:
            with h5py.File(file, "r") as root:
                out = {key: np.asarray(root[name][()], dtype=np.float32)
                       for key, name in self._layout.lowdim.items()}
        except (OSError, KeyError) as err:
            raise DatasetError(problem(file, ep.index, f"cannot read HDF5 ({err})")) from None
        out["frame_index"] = np.arange(ep.length, dtype=np.int64)
        out["timestamp"] = (np.arange(ep.length, dtype=np.float64) / self.fps).astype(np.float32)
        return out

    def iter_frames(self, episode_index: int, camera: str,
                    batch_size: int = 32, decoder_threads: int = 0) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ep = self.episode(episode_index)
        cam = self.camera(camera)
        return self._iter(self._files[ep.index], ep.index, ep.length, cam, batch_size)

    def _iter(self, file: Path, index: int, length: int, cam: CameraInfo,
              batch_size: int) -> Iterator[np.ndarray]:
        assert self._layout is not None
        name = f"{IMAGES_GROUP}/{self._layout.cameras[cam.name]}"
        try:
            with h5py.File(file, "r") as root:
                ds = root[name]
                for lo in range(0, length, batch_size):
                    block = ds[lo:lo + batch_size]
                    yield (self._decode_block(block, file, index, cam, lo)
                           if self._layout.compressed else block)
        except (OSError, KeyError) as err:
            raise DatasetError(problem(file, index, f"camera '{cam.name}': cannot read HDF5 "
                                                    f"({err})")) from None

    def _decode_block(self, block: np.ndarray, file: Path, index: int, cam: CameraInfo,
                      offset: int) -> np.ndarray:
        try:
            frames = decode_many(list(block), decode_jpeg_opencv_order)
        except ImageDecodeError as err:
            at = offset + getattr(err, "index", 0)
            raise DatasetError(problem(file, index, f"camera '{cam.name}': frame {at} does not "
                                                    f"decode as JPEG ({err})")) from None
        for i, frame in enumerate(frames):
            if frame.shape != (cam.height, cam.width, 3):
                raise DatasetError(problem(file, index, f"camera '{cam.name}': frame {offset + i} "
                                                        f"is {frame.shape}, expected "
                                                        f"{(cam.height, cam.width, 3)}"))
        return np.stack(frames)
