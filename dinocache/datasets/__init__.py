"""Demonstration datasets, read and written: the layer below extraction, training and the simulator.

Reading: :func:`open_dataset` opens a dataset in any supported format as a :class:`DatasetSource`
(``base``; per format ``lerobot_v21`` / ``lerobot_v30`` / ``aloha``, decoding in ``video`` /
``images`` / ``parquet``; ``hub`` finds a Hub id's folder); ``prefetch`` decodes streams in background threads and re-cuts batches;
``rows`` decodes the frames of feature-store rows. Writing: ``writer.write_episodes`` writes
``episode.Episode`` streams in every format (``encode`` makes the mp4 / PNG / JPEG bytes), and
``synthetic`` is the sample scene written through it. Nothing here imports torch.

>>> source = open_dataset("data/g1_pick_bottle")          # format detected from the files
>>> source.format, source.fps, list(source.cameras)
('lerobot-v2.1', 30.0, ['observation.images.cam_high'])
>>> low = source.read_lowdim(0)                            # {'observation.state': (T, 26), ...}
>>> for batch in source.iter_frames(0, "cam_high"):        # uint8 (b, 480, 640, 3)
...     ...

Supported formats (see docs/datasets.md): LeRobot v2.1 and v3.0 folders, ALOHA / ACT HDF5
episode folders.
"""

from __future__ import annotations

from pathlib import Path

from dinocache.errors import DatasetError
from dinocache.datasets.aloha import AlohaHdf5Source, episode_files
from dinocache.datasets.hub import resolve_dataset
from dinocache.datasets.base import (
    FORMATS, CameraInfo, DatasetSource, EpisodeInfo, LowDimInfo)
from dinocache.datasets.lerobot_meta import (
    INFO_PATH, SUPPORTED_VERSIONS, check_version, codebase_version)
from dinocache.datasets.lerobot_v21 import LeRobotV21Source
from dinocache.datasets.lerobot_v30 import LeRobotV30Source
from dinocache.datasets.prefetch import iter_episode_batches

__all__ = [
    "FORMATS", "AlohaHdf5Source", "CameraInfo", "DatasetSource", "EpisodeInfo",
    "LeRobotV21Source", "LeRobotV30Source", "LowDimInfo", "detect_format",
    "iter_episode_batches", "open_dataset",
]


def detect_format(path: str | Path) -> str:
    """Name the format of the dataset at ``path`` from its files.

    ``meta/info.json`` makes it LeRobot (its ``codebase_version`` picks v2.1 or v3.0, anything
    else is refused by name); ``episode_<n>.hdf5`` files make it ALOHA HDF5.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise DatasetError(f"{path}: is not a dataset (expected a folder: a LeRobot dataset with "
                           f"{INFO_PATH}, or ALOHA episode_<n>.hdf5 files)")
    if (path / INFO_PATH).is_file():
        version = codebase_version(path)
        check_version(path, version)
        return SUPPORTED_VERSIONS[version]
    if episode_files(path):
        return "aloha-hdf5"
    raise DatasetError(f"{path}: is not a dataset: found neither {INFO_PATH} (LeRobot v2.1 / "
                       "v3.0) nor episode_<n>.hdf5 files (ALOHA)")


def open_dataset(path: str | Path, format: str | None = None, skip_bad_episodes: bool = False,
                 *, fps: float | None = None) -> DatasetSource:
    """Open and validate a dataset.

    Args:
        path: the dataset folder, or a Hugging Face Hub dataset id (``lerobot/pusht``), found in
            ``$HF_LEROBOT_HOME`` or the Hub cache or downloaded (:func:`~dinocache.datasets.hub.resolve_dataset`).
        format: one of :data:`FORMATS`, or None to detect it. A format that contradicts the
            files (``lerobot-v3.0`` for a v2.1 folder) is an error, not a guess.
        skip_bad_episodes: drop malformed episodes into ``source.skipped`` (with the reason)
            instead of raising for the first one.
        fps: frame rate of an ALOHA dataset (default: sidecar, else 50 Hz). LeRobot datasets
            declare theirs, so passing a different one for them is an error.

    Raises:
        DatasetError: one line naming the file, the episode and what is wrong.
    """
    path = resolve_dataset(path).absolute()
    if format is not None and format not in FORMATS:
        raise DatasetError(f"{path}: unknown format '{format}'; formats: {', '.join(FORMATS)}")
    detected = detect_format(path)
    if format is not None and format != detected:
        raise DatasetError(f"{path}: was asked to read it as {format} but it is {detected}")
    if detected == "aloha-hdf5":
        return AlohaHdf5Source(path, skip_bad_episodes=skip_bad_episodes, fps=fps)
    cls = LeRobotV21Source if detected == "lerobot-v2.1" else LeRobotV30Source
    source = cls(path, skip_bad_episodes=skip_bad_episodes)
    if fps is not None and abs(fps - source.fps) > 1e-9:
        raise DatasetError(f"{path / INFO_PATH}: declares fps {source.fps:g}; an fps override "
                           f"({fps:g}) only applies to aloha-hdf5 datasets")
    return source
