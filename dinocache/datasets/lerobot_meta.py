"""LeRobot ``meta/info.json``: versions, path templates and features, as LeRobot writes them.

Kept apart from the readers because the synthetic dataset writer builds the same files from the
same constants: a template spelled once cannot drift between the writer and the reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinocache.errors import DatasetError
from dinocache.datasets.base import CameraInfo, LowDimInfo, problem

SUPPORTED_VERSIONS: dict[str, str] = {"v2.1": "lerobot-v2.1", "v3.0": "lerobot-v3.0"}

INFO_PATH = "meta/info.json"
# v2.1: one parquet and one mp4 per episode, grouped in chunks of `chunks_size` episodes.
V21_EPISODES_PATH = "meta/episodes.jsonl"
V21_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V21_TASKS_PATH = "meta/tasks.jsonl"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
# v3.0: many episodes per parquet / mp4 file; meta/episodes/* says where each one lies.
V30_EPISODES_DIR = "meta/episodes"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_TASKS_PATH = "meta/tasks.parquet"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATS_PATH = "meta/stats.json"
DEFAULT_CHUNKS_SIZE = 1000

#: Bookkeeping columns every LeRobot parquet carries; never exposed as low-dimensional features.
INDEX_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
FLOAT_DTYPES = ("float16", "float32", "float64")
CAMERA_DTYPES = ("video", "image")


@dataclass(frozen=True)
class LeRobotInfo:
    """The parts of ``meta/info.json`` a reader needs, validated.

    ``camera_storage`` says per camera whether frames live in mp4 files (``video``) or as PNG
    bytes inside the parquet (``image``).
    """

    root: Path
    version: str
    fps: float
    chunks_size: int
    data_path: str
    video_path: str | None
    cameras: dict[str, CameraInfo]
    camera_storage: dict[str, str]
    lowdim: dict[str, LowDimInfo]
    raw: dict[str, Any]

    @property
    def info_file(self) -> Path:
        return self.root / INFO_PATH


def load_json(file: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a DatasetError naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(problem(file, None, "file is missing")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(problem(file, None, f"cannot parse JSON ({err})")) from None


def load_jsonl(file: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file (blank lines allowed); errors name the file and the line."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(problem(file, None, "file is missing")) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(problem(file, None, f"line {number} is not JSON ({err})")) from None
        if not isinstance(row, dict):
            raise DatasetError(problem(file, None, f"line {number} is not a JSON object"))
        rows.append(row)
    return rows


def codebase_version(root: Path) -> str:
    """The ``codebase_version`` of ``root/meta/info.json`` (a DatasetError if absent)."""
    info = load_json(root / INFO_PATH)
    version = info.get("codebase_version") if isinstance(info, dict) else None
    if not isinstance(version, str):
        raise DatasetError(problem(root / INFO_PATH, None, "has no 'codebase_version'"))
    return version


def check_version(root: Path, version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(SUPPORTED_VERSIONS)
        raise DatasetError(problem(
            root / INFO_PATH, None,
            f"unsupported LeRobot codebase_version '{version}'; supported: {supported} "
            "(convert older datasets with LeRobot's conversion scripts)"))


def parse_info(root: Path) -> LeRobotInfo:
    """Read and validate ``meta/info.json`` of the dataset at ``root``."""
    file = root / INFO_PATH
    raw = load_json(file)
    if not isinstance(raw, dict):
        raise DatasetError(problem(file, None, "is not a JSON object"))
    version = raw.get("codebase_version")
    check_version(root, str(version))

    def need(key: str) -> Any:
        if key not in raw:
            raise DatasetError(problem(file, None, f"has no '{key}'"))
        return raw[key]

    fps = need("fps")
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise DatasetError(problem(file, None, f"'fps' must be a positive number, got {fps!r}"))
    features = need("features")
    if not isinstance(features, dict):
        raise DatasetError(problem(file, None, "'features' is not an object"))

    cameras: dict[str, CameraInfo] = {}
    storage: dict[str, str] = {}
    lowdim: dict[str, LowDimInfo] = {}
    for key, feature in features.items():
        if not isinstance(feature, dict) or "dtype" not in feature:
            raise DatasetError(problem(file, None, f"feature '{key}' has no 'dtype'"))
        dtype = feature["dtype"]
        shape = _shape(file, key, feature)
        if dtype in CAMERA_DTYPES:
            height, width = _image_size(file, key, feature, shape)
            cameras[key] = CameraInfo(name=key, height=height, width=width)
            storage[key] = dtype
        elif dtype in FLOAT_DTYPES and key not in INDEX_FEATURES:
            lowdim[key] = LowDimInfo(name=key, shape=shape,
                                     names=normalize_names(feature.get("names"), shape))

    video_path = raw.get("video_path")
    if any(kind == "video" for kind in storage.values()) and not isinstance(video_path, str):
        raise DatasetError(problem(file, None, "has video features but no 'video_path' template"))
    data_path = need("data_path")
    chunks_size = raw.get("chunks_size", DEFAULT_CHUNKS_SIZE)
    if not isinstance(chunks_size, int) or chunks_size < 1:
        raise DatasetError(problem(file, None, "'chunks_size' must be a positive integer"))
    return LeRobotInfo(root=root, version=version, fps=float(fps), chunks_size=chunks_size,
                       data_path=str(data_path), video_path=video_path, cameras=cameras,
                       camera_storage=storage, lowdim=lowdim, raw=raw)


def normalize_names(names: Any, shape: tuple[int, ...]) -> list[str] | None:
    """Flatten LeRobot ``names`` to one label per element of a 1-D feature, if they fit.

    Datasets spell names as a list (``["x", "y"]``), a list nested once (``[["x", "y"]]``, as
    ported datasets do), or a dict of lists (``{"motors": ["x", "y"]}``). Anything that does not
    flatten to exactly one string per element is dropped: names are labels, never needed to
    read the data, and a dataset should not be refused for them.
    """
    if names is None:
        return None
    if isinstance(names, dict):
        names = list(names.values())
    flat: list[str] = []

    def walk(item: Any) -> bool:
        if isinstance(item, str):
            flat.append(item)
            return True
        if isinstance(item, (list, tuple)):
            return all(walk(x) for x in item)
        return False

    size = 1
    for dim in shape:
        size *= dim
    if not walk(names) or len(flat) != size:
        return None
    return flat


def _shape(file: Path, key: str, feature: dict[str, Any]) -> tuple[int, ...]:
    shape = feature.get("shape")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise DatasetError(problem(file, None, f"feature '{key}' has a bad shape {shape!r}"))
    return tuple(shape)


def _image_size(file: Path, key: str, feature: dict[str, Any],
                shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of a camera feature: ``info`` video size first, else the named shape."""
    info = feature.get("info") or feature.get("video_info") or {}
    if isinstance(info, dict) and "video.height" in info and "video.width" in info:
        return int(info["video.height"]), int(info["video.width"])
    if len(shape) != 3:
        raise DatasetError(problem(file, None, f"camera '{key}' has shape {list(shape)}, "
                                               "expected [height, width, channels]"))
    names = feature.get("names")
    if isinstance(names, list) and names and names[0] in ("channel", "channels", "c"):
        return shape[1], shape[2]  # (C, H, W), as some ported datasets declare
    return shape[0], shape[1]
