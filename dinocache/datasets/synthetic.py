"""Synthetic demonstration datasets in every supported format, for tests, benchmarks and the demo.

The scene: a coloured disc glides over a per-camera gradient background along a smooth
Lissajous path; its radius opens and closes like a gripper; a pale square marks a fixed goal.
The state is what the camera shows (disc x, y, gripper opening, then "joint" values that are
fixed non-linear functions of those, as joint angles are of an end-effector pose); the action
is the state a few frames ahead. So the actions really depend on the pixels and a policy
trained on frozen image features can learn them.

Everything is a deterministic function of ``seed`` and the episode index: the same call writes
identical frames and arrays in LeRobot v2.1, LeRobot v3.0 and ALOHA HDF5, so tests can check
that the three readers agree (up to codec loss for mp4 and JPEG). Metadata is written as
LeRobot writes it: ``info.json`` with feature dtype/shape/names, ``episodes.jsonl`` +
``episodes_stats.jsonl`` + ``tasks.jsonl`` (v2.1), ``meta/episodes/*.parquet`` +
``tasks.parquet`` + ``stats.json`` (v3.0).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dinocache.datasets.aloha import SIDECAR
from dinocache.keys import ACTION, CAMERA_PREFIX, OBS_ENV_STATE, OBS_STATE
from dinocache.datasets.base import FORMATS
from dinocache.datasets.lerobot_meta import (
    DEFAULT_CHUNKS_SIZE, INDEX_FEATURES, INFO_PATH, STATS_PATH, V21_DATA_PATH,
    V21_EPISODES_PATH, V21_EPISODES_STATS_PATH, V21_TASKS_PATH, V21_VIDEO_PATH,
    V30_DATA_PATH, V30_EPISODES_PATH, V30_TASKS_PATH, V30_VIDEO_PATH)

#: codec -> (encoder, pixel format, crf) used unless overridden: high quality, so that the
#: decoded frames stay within a few grey levels of the rendered ones.
VIDEO_CODECS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "h264": (("libx264", "h264"), "yuv444p", 10),
    "hevc": (("libx265", "hevc"), "yuv444p", 10),
    "av1": (("libsvtav1", "libaom-av1", "av1"), "yuv420p", 20),
}
ACTION_LEAD_FRAMES = 3
DEFAULT_GOP = 12
_PALETTE = [("red", (220, 40, 40)), ("green", (40, 190, 70)), ("blue", (50, 80, 230)),
            ("yellow", (235, 210, 40)), ("magenta", (210, 50, 200)), ("cyan", (40, 200, 210))]
_STATE_NAMES = ("disc_x", "disc_y", "grip")


@dataclass(frozen=True)
class SyntheticEpisode:
    """The ground truth of one generated episode (``frames`` keyed by short camera name).

    Any generator can fill one and hand it to :func:`write_episodes` (the simulator's demonstrations
    do), so there is one writer per format whatever made the frames.
    """

    index: int
    task: str
    frames: dict[str, np.ndarray]
    state: np.ndarray
    velocity: np.ndarray
    action: np.ndarray
    env_state: np.ndarray | None

    @property
    def length(self) -> int:
        return len(self.state)

    def lowdim(self) -> dict[str, np.ndarray]:
        """The arrays under the keys a reader exposes them by."""
        out = {OBS_STATE: self.state, "observation.velocity": self.velocity, ACTION: self.action}
        if self.env_state is not None:
            out[OBS_ENV_STATE] = self.env_state
        return out


class _Trajectory:
    """The latent path z(t) of one episode: disc x, y in [-1, 1], grip in [0, 1], joints."""

    def __init__(self, rng: np.random.Generator, dims: int) -> None:
        self.center = rng.uniform(-0.2, 0.2, 2)
        self.amplitude = rng.uniform(0.3, 0.5, 2)
        self.freq = rng.uniform(0.15, 0.45, 3)  # x, y, grip (Hz)
        self.phase = rng.uniform(0, 2 * np.pi, 3)
        self.weights = rng.normal(0.0, 1.5, (max(dims - 3, 0), 3))
        self.bias = rng.uniform(-0.5, 0.5, max(dims - 3, 0))

    def __call__(self, t: np.ndarray) -> np.ndarray:
        angle = 2 * np.pi * self.freq[None, :] * t[:, None] + self.phase[None, :]
        xy = self.center + self.amplitude * np.sin(angle[:, :2])
        grip = 0.5 + 0.5 * np.sin(angle[:, 2:3])
        visible = np.concatenate([xy, grip], axis=1)
        joints = np.tanh(visible @ self.weights.T + self.bias)
        return np.concatenate([visible, joints], axis=1)


def synthetic_episode(index: int, length: int, *, image_size: tuple[int, int] = (48, 64),
                      cameras: Sequence[str] = ("top",), fps: float = 30, state_dim: int = 4,
                      action_dim: int = 4, seed: int = 0,
                      with_env_state: bool = False) -> SyntheticEpisode:
    """Generate one episode's frames and arrays (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index])
    dims = max(3, state_dim, action_dim)
    path = _Trajectory(rng, dims)
    colour_name, colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
    goal = rng.uniform(-0.7, 0.7, 2)

    t = np.arange(length, dtype=np.float64) / fps
    dt = 1.0 / fps
    z = path(t)
    state = z[:, :state_dim].astype(np.float32)
    velocity = ((path(t + dt) - path(t - dt)) / (2 * dt))[:, :state_dim].astype(np.float32)
    action = path(t + ACTION_LEAD_FRAMES * dt)[:, :action_dim].astype(np.float32)
    env_state = np.tile(goal.astype(np.float32), (length, 1)) if with_env_state else None
    frames = {cam: np.stack([_render(z[i], goal, colour, k, image_size) for i in range(length)])
              if length else np.zeros((0, *image_size, 3), np.uint8)
              for k, cam in enumerate(cameras)}
    return SyntheticEpisode(index=index, task=f"follow the {colour_name} disc", frames=frames,
                            state=state, velocity=velocity, action=action, env_state=env_state)


def _render(z: np.ndarray, goal: np.ndarray, colour: tuple[int, int, int], camera: int,
            image_size: tuple[int, int]) -> np.ndarray:
    """One frame. Odd cameras see the scene mirrored; each camera has its own background.

    Shapes have a one-pixel anti-aliased edge (kinder to video codecs than a hard edge) and
    are composited over the background only inside their bounding box.
    """
    height, width = image_size
    background, background_u8 = _background(camera, height, width)
    mirror = -1.0 if camera % 2 else 1.0
    scale = min(height, width) / 2
    gu, gv = (mirror * goal[0] + 1) / 2 * width, (goal[1] + 1) / 2 * height
    cu, cv = (mirror * z[0] + 1) / 2 * width, (z[1] + 1) / 2 * height
    half = 0.07 * scale
    radius = (0.14 + 0.1 * z[2]) * scale

    reach = max(half, radius) + 1
    x0 = max(int(np.floor(min(gu, cu) - reach)), 0)
    x1 = min(int(np.ceil(max(gu, cu) + reach)) + 1, width)
    y0 = max(int(np.floor(min(gv, cv) - reach)), 0)
    y1 = min(int(np.ceil(max(gv, cv) + reach)) + 1, height)
    image = background_u8.copy()
    if x0 >= x1 or y0 >= y1:
        return image
    u = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    v = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    patch = background[y0:y1, x0:x1].copy()
    goal_alpha = np.clip(half - np.maximum(np.abs(u - gu), np.abs(v - gv)) + 0.5, 0, 1)
    patch += goal_alpha[..., None] * (np.array([235.0, 235.0, 225.0]) - patch)
    disc_alpha = np.clip(radius - np.hypot(u - cu, v - cv) + 0.5, 0, 1)
    patch += disc_alpha[..., None] * (np.array(colour, dtype=np.float64) - patch)
    image[y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return image


@functools.lru_cache(maxsize=16)
def _background(camera: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A camera's vertical gradient, as floats (for compositing) and rounded to uint8."""
    shade = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
    image = np.empty((height, width, 3))
    for ch in range(3):
        image[..., ch] = 30 + 25 * ch + 40 * ((camera + ch) % 3) * shade + 60 * shade
    rounded = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image.flags.writeable = False
    rounded.flags.writeable = False
    return image, rounded


# --------------------------------------------------------------------------------- video --
def encode_video(path: Path, frames: Iterable[np.ndarray], fps: float, codec: str = "h264", *,
                 crf: int | None = None, pix_fmt: str | None = None,
                 gop: int | None = None) -> None:
    """Encode RGB uint8 frames to an mp4 whose frame ``i`` is presented at ``i / fps`` seconds."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {codec!r}")
    encoders, default_pix_fmt, default_crf = VIDEO_CODECS[codec]
    encoder = _available_encoder(encoders)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(100_000)
    options = {"crf": str(default_crf if crf is None else crf),
               "g": str(DEFAULT_GOP if gop is None else gop)}
    if encoder == "libx265":
        options["x265-params"] = "log-level=error"
    elif encoder == "libsvtav1":
        options["preset"] = "10"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.pix_fmt = pix_fmt or default_pix_fmt
        stream.codec_context.time_base = 1 / rate
        started = False
        for i, array in enumerate(frames):
            if not started:
                stream.height, stream.width = array.shape[:2]
                started = True
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _available_encoder(names: Sequence[str]) -> str:
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    raise RuntimeError(f"PyAV has none of the encoders {', '.join(names)}")


# --------------------------------------------------------------------------------- entry --
@dataclass(frozen=True)
class _Spec:
    fps: float
    image_size: tuple[int, int]
    cameras: tuple[str, ...]
    codec: str
    image_storage: str
    state_dim: int
    action_dim: int
    with_env_state: bool
    crf: int | None
    pix_fmt: str | None
    gop: int | None
    #: Per-dimension names of ``observation.state`` / ``action`` (default: the disc scene's).
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    robot_type: str = "synthetic_disc"
    #: ALOHA only: the task the sidecar records (the format has no per-episode task).
    aloha_task: str = "follow the coloured disc"

    @property
    def video_keys(self) -> list[str]:
        return [CAMERA_PREFIX + c for c in self.cameras] if self.image_storage == "video" else []


def write_synthetic_dataset(out: Path | str, format: str = "lerobot-v2.1", num_episodes: int = 3,
                            episode_length: int | Sequence[int] = 20,
                            image_size: tuple[int, int] = (48, 64),
                            cameras: Sequence[str] = ("top",), fps: float = 30,
                            codec: str = "h264", state_dim: int = 4, action_dim: int = 4,
                            seed: int = 0, with_env_state: bool = False,
                            image_storage: str = "video", aloha_compressed: bool = False, *,
                            episodes_per_file: int | None = None, crf: int | None = None,
                            pix_fmt: str | None = None, gop: int | None = None,
                            jpeg_quality: int = 95) -> Path:
    """Write a synthetic dataset to the empty (or absent) folder ``out`` and return its path.

    Args:
        format: ``lerobot-v2.1``, ``lerobot-v3.0`` or ``aloha-hdf5``.
        episode_length: one length for all episodes, or one per episode.
        image_size: ``(height, width)``.
        codec: mp4 codec of LeRobot videos (``h264``, ``hevc``, ``av1``); ``crf``, ``pix_fmt``
            and ``gop`` override the high-quality defaults of :data:`VIDEO_CODECS`.
        image_storage: LeRobot only: ``video`` (mp4 files) or ``image`` (PNG bytes in parquet).
        aloha_compressed: ALOHA only: store frames as zero-padded JPEG bytes, as ALOHA's
            real-robot recorder does (quality ``jpeg_quality``).
        episodes_per_file: LeRobot v3.0 only: episodes packed per parquet / mp4 file
            (default: all in one file).
    """
    out = Path(out)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if image_storage not in ("video", "image"):
        raise ValueError(f"image_storage must be 'video' or 'image', got {image_storage!r}")
    if format == "aloha-hdf5" and (with_env_state or image_storage != "video"):
        raise ValueError("ALOHA HDF5 has neither an environment state nor an image_storage choice")
    if aloha_compressed and format != "aloha-hdf5":
        raise ValueError("aloha_compressed only applies to format='aloha-hdf5'")
    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {codec!r}")
    lengths = ([int(episode_length)] * num_episodes if isinstance(episode_length, int)
               else [int(n) for n in episode_length])
    if len(lengths) != num_episodes:
        raise ValueError(f"{len(lengths)} episode lengths for {num_episodes} episodes")
    episodes = (synthetic_episode(i, n, image_size=tuple(image_size), cameras=tuple(cameras), fps=fps,
                                  state_dim=state_dim, action_dim=action_dim, seed=seed,
                                  with_env_state=with_env_state)
                for i, n in enumerate(lengths))
    return write_episodes(out, episodes, format=format, fps=fps, image_size=image_size, cameras=cameras,
                          state_dim=state_dim, action_dim=action_dim, codec=codec,
                          with_env_state=with_env_state, image_storage=image_storage,
                          aloha_compressed=aloha_compressed, episodes_per_file=episodes_per_file or num_episodes,
                          crf=crf, pix_fmt=pix_fmt, gop=gop, jpeg_quality=jpeg_quality)


def write_episodes(out: Path | str, episodes: Iterable[SyntheticEpisode], *, format: str, fps: float,
                   image_size: tuple[int, int], cameras: Sequence[str], state_dim: int, action_dim: int,
                   codec: str = "h264", with_env_state: bool = False, image_storage: str = "video",
                   aloha_compressed: bool = False, episodes_per_file: int | None = None,
                   crf: int | None = None, pix_fmt: str | None = None, gop: int | None = None,
                   jpeg_quality: int = 95, state_names: Sequence[str] | None = None,
                   action_names: Sequence[str] | None = None, robot_type: str = "synthetic_disc",
                   aloha_task: str = "follow the coloured disc") -> Path:
    """Write ``episodes`` (consumed one at a time, numbered 0, 1, ... by their ``index``) to ``out``.

    The writer behind :func:`write_synthetic_dataset`, for any source of episodes; the arguments mean
    the same. ``state_names`` / ``action_names`` label the dimensions in ``info.json`` and
    ``robot_type`` is recorded there; ``aloha_task`` is the ALOHA sidecar's task. ``out`` must be
    empty or absent.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    spec = _Spec(fps=fps, image_size=tuple(image_size), cameras=tuple(cameras), codec=codec,
                 image_storage=image_storage, state_dim=state_dim, action_dim=action_dim,
                 with_env_state=with_env_state, crf=crf, pix_fmt=pix_fmt, gop=gop,
                 state_names=tuple(state_names) if state_names else None,
                 action_names=tuple(action_names) if action_names else None,
                 robot_type=robot_type, aloha_task=aloha_task)
    if format == "aloha-hdf5":
        _write_aloha(out, episodes, spec, aloha_compressed, jpeg_quality)
    elif format == "lerobot-v2.1":
        _write_lerobot_v21(out, episodes, spec)
    elif format == "lerobot-v3.0":
        _write_lerobot_v30(out, episodes, spec, episodes_per_file or sys.maxsize)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return out


# -------------------------------------------------------------------------------- LeRobot --
def _features(spec: _Spec, version: str) -> dict[str, dict[str, Any]]:
    """info.json ``features`` in LeRobot's order: lowdim, cameras, then the index columns."""
    def names(given: tuple[str, ...] | None, n: int) -> list[str]:
        return list(given) if given else [_STATE_NAMES[i] if i < 3 else f"joint_{i}" for i in range(n)]

    features: dict[str, dict[str, Any]] = {
        OBS_STATE: {"dtype": "float32", "shape": [spec.state_dim],
                              "names": names(spec.state_names, spec.state_dim)},
        "observation.velocity": {"dtype": "float32", "shape": [spec.state_dim],
                                 "names": names(spec.state_names, spec.state_dim)},
    }
    if spec.with_env_state:
        features[OBS_ENV_STATE] = {"dtype": "float32", "shape": [2],
                                                     "names": ["goal_x", "goal_y"]}
    features[ACTION] = {"dtype": "float32", "shape": [spec.action_dim],
                          "names": names(spec.action_names, spec.action_dim)}
    height, width = spec.image_size
    for cam in spec.cameras:
        feature: dict[str, Any] = {"dtype": spec.image_storage, "shape": [height, width, 3],
                                   "names": ["height", "width", "channels"]}
        if spec.image_storage == "video":
            encoders, default_pix_fmt, _ = VIDEO_CODECS[spec.codec]
            feature["info"] = {
                "video.height": height, "video.width": width, "video.codec": spec.codec,
                "video.pix_fmt": spec.pix_fmt or default_pix_fmt, "video.is_depth_map": False,
                "video.fps": spec.fps, "video.channels": 3, "has_audio": False}
        features[CAMERA_PREFIX + cam] = feature
    features.update(json.loads(json.dumps(INDEX_FEATURES)))
    if version == "v3.0":  # v3.0 records the rate of every non-video feature
        for feature in features.values():
            if feature["dtype"] != "video":
                feature["fps"] = spec.fps
    return features


def _info(spec: _Spec, version: str, num_episodes: int, num_frames: int,
          num_tasks: int, **layout: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "codebase_version": version, "robot_type": spec.robot_type,
        "total_episodes": num_episodes, "total_frames": num_frames, "total_tasks": num_tasks}
    info.update(layout)
    info["fps"] = spec.fps
    info["splits"] = {"train": f"0:{num_episodes}"}
    info["data_path"] = V21_DATA_PATH if version == "v2.1" else V30_DATA_PATH
    template = V21_VIDEO_PATH if version == "v2.1" else V30_VIDEO_PATH
    info["video_path"] = template if spec.video_keys else None
    info["features"] = _features(spec, version)
    return info


def _frame_table(ep: SyntheticEpisode, spec: _Spec, first_index: int,
                 task_index: int) -> pa.Table:
    """One episode's rows, typed as ``datasets`` writes them (fixed-size lists, Image structs)."""
    length = ep.length
    columns: dict[str, pa.Array] = {}
    hf_features: dict[str, Any] = {}
    for key, value in ep.lowdim().items():
        dim = value.shape[1]
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), dim)
        hf_features[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim,
                            "_type": "Sequence"}
    if spec.image_storage == "image":
        for cam in spec.cameras:
            pngs = [_png(frame) for frame in ep.frames[cam]]
            columns[CAMERA_PREFIX + cam] = pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()),
                 pa.array([f"frame_{i:06d}.png" for i in range(length)], pa.string())],
                names=["bytes", "path"])
            hf_features[CAMERA_PREFIX + cam] = {"_type": "Image"}
    frame_index = np.arange(length, dtype=np.int64)
    columns["timestamp"] = pa.array((frame_index / spec.fps).astype(np.float32))
    columns["frame_index"] = pa.array(frame_index)
    columns["episode_index"] = pa.array(np.full(length, ep.index, np.int64))
    columns["index"] = pa.array(first_index + frame_index)
    columns["task_index"] = pa.array(np.full(length, task_index, np.int64))
    for key in INDEX_FEATURES:
        hf_features[key] = {"dtype": INDEX_FEATURES[key]["dtype"], "_type": "Value"}
    table = pa.table(columns)
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features}}).encode()}
    return table.replace_schema_metadata(meta)


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _stats(values: np.ndarray) -> dict[str, Any]:
    """LeRobot per-feature stats of a low-dimensional array: min/max/mean/std over frames."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    return {"min": flat.min(0).tolist(), "max": flat.max(0).tolist(),
            "mean": flat.mean(0).tolist(), "std": flat.std(0).tolist(), "count": [len(values)]}


def _image_stats(frames: np.ndarray) -> dict[str, Any]:
    """LeRobot image stats: per channel, in [0, 1], shaped (3, 1, 1), over sampled frames.

    Like LeRobot, about ``T ** 0.75`` frames (at least 100, or all when fewer) are sampled
    evenly and frames larger than 300 px are strided down to about 150 px; ``count`` is the
    number of frames sampled.
    """
    length = len(frames)
    wanted = length if length < 100 else max(100, min(int(length ** 0.75), 10_000))
    picked = frames[np.round(np.linspace(0, length - 1, wanted)).astype(int)]
    height, width = picked.shape[1:3]
    if max(height, width) >= 300:
        step = int(max(height, width) / 150)
        picked = picked[:, ::step, ::step]
    pixels = picked.reshape(-1, 3).astype(np.float32) / 255.0
    stats = {"min": pixels.min(0), "max": pixels.max(0), "mean": pixels.mean(0, dtype=np.float64),
             "std": pixels.std(0, dtype=np.float64)}
    return {**{k: np.asarray(v, np.float64).reshape(3, 1, 1).tolist() for k, v in stats.items()},
            "count": [len(picked)]}


def _aggregate_stats(per_episode: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """meta/stats.json from per-episode stats, as LeRobot aggregates them.

    Means are weighted by ``count``; the variance pools each episode's variance with the spread
    of the episode means around the overall mean.
    """
    out: dict[str, Any] = {}
    for key in per_episode[0]:
        parts = [ep[key] for ep in per_episode]
        counts = np.array([p["count"][0] for p in parts], np.float64)
        means = np.array([p["mean"] for p in parts], np.float64)
        stds = np.array([p["std"] for p in parts], np.float64)
        weights = (counts / counts.sum()).reshape(-1, *([1] * (means.ndim - 1)))
        mean = (weights * means).sum(0)
        variance = (weights * (stds ** 2 + (means - mean) ** 2)).sum(0)
        out[key] = {"min": np.min([p["min"] for p in parts], axis=0).tolist(),
                    "max": np.max([p["max"] for p in parts], axis=0).tolist(),
                    "mean": mean.tolist(), "std": np.sqrt(variance).tolist(),
                    "count": [int(counts.sum())]}
    return out


def _episode_stats(ep: SyntheticEpisode, table: pa.Table, spec: _Spec) -> dict[str, Any]:
    stats = {key: _stats(value) for key, value in ep.lowdim().items()}
    for cam in spec.cameras:
        stats[CAMERA_PREFIX + cam] = _image_stats(ep.frames[cam])
    for key in INDEX_FEATURES:
        stats[key] = _stats(table[key].to_numpy())
    return stats


def _write_json(file: Path, data: Any) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(file: Path, rows: Iterable[dict[str, Any]]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")


def _write_parquet(file: Path, table: pa.Table) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)


def _write_lerobot_v21(out: Path, episodes: Iterable[SyntheticEpisode], spec: _Spec) -> None:
    listing, stats_rows, tasks = [], [], {}
    total = 0
    for ep in episodes:
        task_index = tasks.setdefault(ep.task, len(tasks))
        chunk = ep.index // DEFAULT_CHUNKS_SIZE
        table = _frame_table(ep, spec, total, task_index)
        _write_parquet(out / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep.index),
                       table)
        for cam, key in zip(spec.cameras, spec.video_keys):
            encode_video(out / V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=key,
                                                     episode_index=ep.index),
                         ep.frames[cam], spec.fps, spec.codec, crf=spec.crf,
                         pix_fmt=spec.pix_fmt, gop=spec.gop)
        listing.append({"episode_index": ep.index, "tasks": [ep.task], "length": ep.length})
        stats_rows.append({"episode_index": ep.index,
                           "stats": _episode_stats(ep, table, spec)})
        total += ep.length
    _write_jsonl(out / V21_EPISODES_PATH, listing)
    _write_jsonl(out / V21_EPISODES_STATS_PATH, stats_rows)
    _write_jsonl(out / V21_TASKS_PATH, [{"task_index": i, "task": t} for t, i in tasks.items()])
    chunks = (len(listing) - 1) // DEFAULT_CHUNKS_SIZE + 1
    _write_json(out / INFO_PATH, _info(
        spec, "v2.1", len(listing), total, len(tasks),
        total_videos=len(listing) * len(spec.video_keys), total_chunks=chunks,
        chunks_size=DEFAULT_CHUNKS_SIZE))


def _write_lerobot_v30(out: Path, episodes: Iterable[SyntheticEpisode], spec: _Spec,
                       per_file: int) -> None:
    """Pack ``per_file`` episodes per parquet / mp4, holding one file's episodes in memory."""
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    all_stats: list[dict[str, Any]] = []
    total = 0
    stream = iter(episodes)
    for number, group in enumerate(iter(lambda: list(itertools.islice(stream, per_file)), [])):
        chunk, file = divmod(number, DEFAULT_CHUNKS_SIZE)
        tables = []
        for ep in group:
            task_index = tasks.setdefault(ep.task, len(tasks))
            tables.append(_frame_table(ep, spec, total + sum(t.num_rows for t in tables),
                                       task_index))
        data_file = out / V30_DATA_PATH.format(chunk_index=chunk, file_index=file)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(data_file, tables[0].schema) as writer:
            for table in tables:  # one row group per episode, as LeRobot writes them
                writer.write_table(table)
        for cam, key in zip(spec.cameras, spec.video_keys):
            encode_video(out / V30_VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                     file_index=file),
                         (frame for ep in group for frame in ep.frames[cam]), spec.fps,
                         spec.codec, crf=spec.crf, pix_fmt=spec.pix_fmt, gop=spec.gop)
        offset = 0
        for ep, table in zip(group, tables):
            row: dict[str, Any] = {
                "episode_index": ep.index, "tasks": [ep.task], "length": ep.length,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": total, "dataset_to_index": total + ep.length}
            for key in spec.video_keys:
                row[f"videos/{key}/chunk_index"] = chunk
                row[f"videos/{key}/file_index"] = file
                row[f"videos/{key}/from_timestamp"] = offset / spec.fps
                row[f"videos/{key}/to_timestamp"] = (offset + ep.length) / spec.fps
            episode_stats = _episode_stats(ep, table, spec)
            all_stats.append(episode_stats)
            for feature, stats in episode_stats.items():
                for name, value in stats.items():
                    row[f"stats/{feature}/{name}"] = value
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            rows.append(row)
            offset += ep.length
            total += ep.length
    _write_parquet(out / V30_EPISODES_PATH.format(chunk_index=0, file_index=0),
                   pa.Table.from_pylist(rows))
    _write_parquet(out / V30_TASKS_PATH, _tasks_table(tasks))
    _write_json(out / STATS_PATH, _aggregate_stats(all_stats))
    _write_json(out / INFO_PATH, _info(
        spec, "v3.0", len(rows), total, len(tasks), chunks_size=DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb=100, video_files_size_in_mb=500))


def _tasks_table(tasks: dict[str, int]) -> pa.Table:
    """``meta/tasks.parquet`` as pandas writes LeRobot's DataFrame indexed by ``task``.

    The pandas metadata makes ``pd.read_parquet`` (what LeRobot uses) restore ``task`` as the
    index; pyarrow readers see it as an ordinary column.
    """
    table = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()),
                      "task": pa.array(list(tasks), pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                            "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3"}
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


# ---------------------------------------------------------------------------------- ALOHA --
def _write_aloha(out: Path, episodes: Iterable[SyntheticEpisode], spec: _Spec,
                 compressed: bool, jpeg_quality: int) -> None:
    for ep in episodes:
        with h5py.File(out / f"episode_{ep.index}.hdf5", "w") as root:
            root.attrs["sim"] = True
            obs = root.create_group("observations")
            images = obs.create_group("images")
            if compressed:
                root.attrs["compress"] = True
                encoded = {cam: [_jpeg_opencv_order(f, jpeg_quality) for f in ep.frames[cam]]
                           for cam in spec.cameras}
                padded = max(len(b) for blobs in encoded.values() for b in blobs)
                for cam, blobs in encoded.items():
                    data = np.zeros((ep.length, padded), np.uint8)
                    for i, blob in enumerate(blobs):
                        data[i, :len(blob)] = np.frombuffer(blob, np.uint8)
                    images.create_dataset(cam, data=data, chunks=(1, padded))
                root.create_dataset("compress_len", data=np.array(
                    [[len(b) for b in encoded[cam]] for cam in spec.cameras], np.float32))
            else:
                for cam in spec.cameras:
                    images.create_dataset(cam, data=ep.frames[cam],
                                          chunks=(1, *ep.frames[cam].shape[1:]))
            obs.create_dataset("qpos", data=ep.state)
            obs.create_dataset("qvel", data=ep.velocity)
            root.create_dataset("action", data=ep.action)
    _write_json(out / SIDECAR, {"fps": spec.fps, "task": spec.aloha_task})


def _jpeg_opencv_order(frame: np.ndarray, quality: int) -> bytes:
    """Encode like ALOHA's ``cv2.imencode`` does: the RGB array is taken to be BGR."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame[..., ::-1])).save(
        buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
