"""What LeRobot v2.1 and v3.0 share: parquet rows per episode, validation, frame streaming.

The two versions differ only in *where* an episode lives (one parquet + one mp4 per episode in
v2.1; a row range of a shared parquet and a time window of a shared mp4 in v3.0). Subclasses
answer that in :meth:`LeRobotSource._scan`, :meth:`~LeRobotSource._data_file` and
:meth:`~LeRobotSource._video_window`; everything else is here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinocache.errors import DatasetError
from dinocache.datasets.base import (
    DatasetSource, EpisodeBook, first_nonfinite, lowdim_digest, problem)
from dinocache.datasets.images import ImageDecodeError, decode_many, decode_rgb
from dinocache.datasets.lerobot_meta import SUPPORTED_VERSIONS, parse_info
from dinocache.datasets.parquet import (
    ParquetReadError, column_to_numpy, iter_episode_column, open_parquet, read_episode_rows)
from dinocache.datasets.video import (
    EpisodeClip, VideoProbe, VideoReadError, iter_clip, probe_video)

#: Per-frame bookkeeping columns read with the low-dimensional features.
_FRAME_COLUMNS = ("frame_index", "timestamp")

#: How far the rate measured from the timestamps or the video may be from the declared ``fps``.
FPS_TOLERANCE = 0.05


class LeRobotSource(DatasetSource):
    """A local LeRobot dataset (v2.1 or v3.0), validated when opened."""

    def __init__(self, path: Path, skip_bad_episodes: bool = False) -> None:
        self.path = Path(path).expanduser().absolute()
        self.info = parse_info(self.path)
        self.format = SUPPORTED_VERSIONS[self.info.version]
        self.fps = self.info.fps
        self.cameras = dict(self.info.cameras)
        self.lowdim = dict(self.info.lowdim)
        self._meta_files = sorted(p for p in (self.path / "meta").rglob("*") if p.is_file())
        self._lowdim_digests = {}
        self._video_files = []
        self._timestamp_steps: list[np.ndarray] = []
        self._video_rates: dict[Path, float] = {}
        book = EpisodeBook(self.path)
        self._scan(book)
        self._check_fps()
        self.episodes, self.skipped = book.finish(skip_bad_episodes)

    # ----------------------------------------------------------------- subclass interface --
    @abstractmethod
    def _scan(self, book: EpisodeBook) -> None:
        """List every episode in ``book``, marking the bad ones, and fill the fingerprint lists."""

    @abstractmethod
    def _data_file(self, episode_index: int) -> Path:
        """The parquet file holding the episode's rows."""

    @abstractmethod
    def _video_window(self, episode_index: int, camera: str) -> tuple[Path, float, bool]:
        """``(mp4, from_timestamp, whole_file)`` locating the episode in the camera's video."""

    def _template(self, name: str, **fields: object) -> Path:
        """Fill the ``data_path`` / ``video_path`` template of meta/info.json."""
        template = self.info.data_path if name == "data_path" else self.info.video_path
        try:
            return self.path / str(template).format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise DatasetError(problem(self.info.info_file, None,
                                       f"cannot fill the {name} template {template!r} ({err!r})")) from None

    # ------------------------------------------------------------------- shared validation --
    @property
    def _lowdim_columns(self) -> list[str]:
        return [*self.lowdim, *_FRAME_COLUMNS]

    def _read_table(self, file: Path, episode_index: int | None,
                    columns: list[str]) -> pa.Table:
        pf = open_parquet(file)
        return read_episode_rows(pf, columns, episode_index)

    def _arrays(self, table: pa.Table, file: Path, episode: int | None) -> dict[str, np.ndarray]:
        """Convert the low-dimensional and frame columns of ``table`` to numpy (see read_lowdim)."""
        out: dict[str, np.ndarray] = {}
        specs = [(k, self.lowdim[k].shape, np.float32) for k in self.lowdim]
        specs += [("frame_index", (), np.int64), ("timestamp", (), np.float32)]
        if "episode_index" in table.column_names:
            specs.append(("episode_index", (), np.int64))
        for key, shape, dtype in specs:
            try:
                out[key] = column_to_numpy(table[key], shape, dtype)
            except ParquetReadError as err:
                raise DatasetError(problem(file, episode, f"column '{key}' {err}")) from None
        return out

    def _rows_problem(self, file: Path, episode: int, arrays: dict[str, np.ndarray],
                      length: int, length_source: str) -> str | None:
        """First thing wrong with one episode's rows, as a message, or None when they are fine."""
        rows = len(arrays["frame_index"])
        if rows != length:
            return problem(file, episode, f"parquet has {rows} rows but {length_source} says "
                                          f"length {length}")
        frame_index = arrays["frame_index"]
        if not np.array_equal(frame_index, np.arange(rows)):
            at = int(np.argmax(frame_index != np.arange(rows)))
            return problem(file, episode, f"frame_index is not 0..{rows - 1} in order "
                                          f"(row {at} has {int(frame_index[at])})")
        for key in [*self.lowdim, "timestamp"]:
            bad = first_nonfinite(arrays[key])
            if bad is not None:
                return problem(file, episode, f"'{key}' contains {bad[1]} at frame {bad[0]}")
        steps = np.diff(arrays["timestamp"].astype(np.float64))
        if rows > 1 and not (steps > 0).all():
            at = int(np.argmax(steps <= 0)) + 1
            return problem(file, episode, f"timestamps do not increase at frame {at}")
        return None

    def _scanned_rows_problem(self, file: Path, episode: int, arrays: dict[str, np.ndarray],
                              length: int, length_source: str) -> str | None:
        """:meth:`_rows_problem` while opening: a good episode's timestamps also go to :meth:`_check_fps`."""
        bad = self._rows_problem(file, episode, arrays, length, length_source)
        if bad is None:
            self._timestamp_steps.append(np.diff(arrays["timestamp"].astype(np.float64)))
        return bad

    def _check_fps(self) -> None:
        """Refuse a declared ``fps`` that the parquet timestamps or the videos contradict.

        Frames are matched to rows by timestamp, so a wrong ``fps`` reads without complaint; but it is
        recorded in the store and becomes the exported policy's control rate, where a policy run at
        half the rate it was trained for fails on the robot. The median step is the measure, so
        recorded timestamps with jitter or a dropped frame do not trip it.
        """
        steps = np.concatenate(self._timestamp_steps) if self._timestamp_steps else np.empty(0)
        measured = []
        if len(steps):
            measured.append(("the parquet timestamps", 1.0 / float(np.median(steps))))
        if self._video_rates:
            measured.append(("the videos", float(np.median(list(self._video_rates.values())))))
        wrong = [f"{what} run at {rate:.4g} fps" for what, rate in measured
                 if abs(rate - self.fps) > FPS_TOLERANCE * self.fps]
        if wrong:
            raise DatasetError(problem(self.info.info_file, None, f"declares fps {self.fps:g}, but "
                                       f"{' and '.join(wrong)}; correct 'fps' (it is recorded in the "
                                       f"feature store and becomes the exported policy's control rate)"))

    def _probe_videos(self, files: list[Path]) -> dict[Path, VideoProbe | str]:
        """Read the headers of many videos in parallel (I/O bound on network storage)."""
        def one(file: Path) -> VideoProbe | str:
            try:
                return probe_video(file)
            except VideoReadError as err:
                return str(err)

        if not files:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
            probes = dict(zip(files, pool.map(one, files)))
        for file, probe in probes.items():  # the stream's frame rate, where the container says enough
            if not isinstance(probe, str) and probe.frames > 1 and probe.duration:
                self._video_rates[file] = probe.frames / probe.duration
        return probes

    def _video_problem(self, probe: VideoProbe | str, file: Path, episode: int,
                       camera: str) -> str | None:
        """Header-level problems: unreadable, or a frame size that is not the dataset's."""
        if isinstance(probe, str):
            return problem(file, episode, f"camera '{camera}': {probe}")
        cam = self.cameras[camera]
        if (probe.height, probe.width) != (cam.height, cam.width):
            return problem(file, episode, f"camera '{camera}': video is {probe.width}x"
                                          f"{probe.height}, meta/info.json says "
                                          f"{cam.width}x{cam.height}")
        return None

    # ----------------------------------------------------------------------------- reading --
    def read_lowdim(self, episode_index: int) -> dict[str, np.ndarray]:
        ep = self.episode(episode_index)
        file = self._data_file(ep.index)
        try:
            table = self._read_table(file, ep.index, self._lowdim_columns)
        except ParquetReadError as err:
            raise DatasetError(problem(file, ep.index, str(err))) from None
        arrays = self._arrays(table, file, ep.index)
        bad = self._rows_problem(file, ep.index, arrays, ep.length, "the episode table")
        if bad is not None:  # the file changed since the dataset was opened
            raise DatasetError(bad)
        return arrays

    def iter_frames(self, episode_index: int, camera: str,
                    batch_size: int = 32, decoder_threads: int = 0) -> Iterator[np.ndarray]:
        ep = self.episode(episode_index)
        key = self.camera(camera).name
        if self.info.camera_storage[key] == "image":
            return self._iter_images(ep.index, ep.length, key, batch_size)
        return iter_clip(self._clip(ep.index, key), batch_size, decoder_threads)

    def _clip(self, episode_index: int, camera: str) -> EpisodeClip:
        file = self._data_file(episode_index)
        try:
            table = self._read_table(file, episode_index, ["timestamp"])
            timestamps = column_to_numpy(table["timestamp"], (), np.float64)
        except ParquetReadError as err:
            raise DatasetError(problem(file, episode_index, str(err))) from None
        video, start, whole_file = self._video_window(episode_index, camera)
        cam = self.cameras[camera]
        return EpisodeClip(path=video, episode=episode_index, camera=camera,
                           timestamps=start + timestamps, fps=self.fps, height=cam.height,
                           width=cam.width, whole_file=whole_file)

    def _iter_images(self, episode_index: int, length: int, camera: str,
                     batch_size: int) -> Iterator[np.ndarray]:
        """Stream frames stored as PNG/JPEG bytes in the parquet (``dtype: image`` features)."""
        file = self._data_file(episode_index)
        cam = self.cameras[camera]
        count = 0
        try:
            pf = open_parquet(file)
            for column in iter_episode_column(pf, camera, episode_index, batch_size):
                buffers = self._image_buffers(column, file, episode_index, camera, count)
                try:
                    frames = decode_many(buffers, decode_rgb)
                except ImageDecodeError as err:
                    at = count + getattr(err, "index", 0)
                    what = f"camera '{camera}': frame {at} does not decode ({err})"
                    raise DatasetError(problem(file, episode_index, what)) from None
                for i, frame in enumerate(frames):
                    if frame.shape[:2] != (cam.height, cam.width):
                        raise DatasetError(problem(
                            file, episode_index, f"camera '{camera}': frame {count + i} is "
                            f"{frame.shape[1]}x{frame.shape[0]}, meta/info.json says "
                            f"{cam.width}x{cam.height}"))
                count += len(frames)
                yield np.stack(frames)
        except ParquetReadError as err:
            raise DatasetError(problem(file, episode_index, str(err))) from None
        if count != length:
            raise DatasetError(problem(file, episode_index, f"camera '{camera}': {count} images "
                                                            f"for {length} rows"))

    def _image_buffers(self, column: pa.Array, file: Path, episode: int, camera: str,
                       offset: int) -> list[bytes]:
        """Bytes of each image cell: ``{bytes, path}`` structs (``datasets.Image``) or binary."""
        if pa.types.is_struct(column.type):
            data = column.field("bytes").to_pylist()
            paths = (column.field("path").to_pylist()
                     if column.type.get_field_index("path") >= 0 else [None] * len(data))
        else:
            data, paths = column.to_pylist(), [None] * len(column)
        out = []
        for i, (blob, rel) in enumerate(zip(data, paths)):
            if blob is None and rel:
                image = Path(rel) if Path(rel).is_absolute() else self.path / rel
                if image.is_file():
                    blob = image.read_bytes()
            if blob is None:
                raise DatasetError(problem(file, episode, f"camera '{camera}': frame "
                                                          f"{offset + i} has no image bytes"))
            out.append(blob)
        return out

    def _digest(self, arrays: dict[str, np.ndarray]) -> str:
        return lowdim_digest([arrays[k] for k in sorted(arrays)])
