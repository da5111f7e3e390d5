"""What the dataset writer takes: episodes held in memory, and how to lay them out on disk.

Any generator fills :class:`Episode` (the synthetic scene, the simulator's scripted demonstrations)
and hands it to :func:`~dinocache.datasets.writer.write_episodes`, so there is one writer per
format whatever made the frames. This module sits below the per-format writers, which all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinocache.keys import ACTION, OBS_ENV_STATE, OBS_STATE, OBS_VELOCITY, camera_key

__all__ = ["Episode", "WriteSpec"]


@dataclass(frozen=True)
class Episode:
    """One episode's frames (uint8 ``(T, H, W, 3)`` keyed by short camera name) and arrays.

    Episodes are numbered 0, 1, ... by ``index`` in the order they are written.
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
        out = {OBS_STATE: self.state, OBS_VELOCITY: self.velocity, ACTION: self.action}
        if self.env_state is not None:
            out[OBS_ENV_STATE] = self.env_state
        return out


@dataclass(frozen=True)
class WriteSpec:
    """Everything about a dataset that is not in its episodes (the arguments of ``write_episodes``)."""

    fps: float
    image_size: tuple[int, int]
    cameras: tuple[str, ...]
    state_dim: int
    action_dim: int
    #: LeRobot: mp4 codec of the videos, and overrides of its defaults in ``encode.VIDEO_CODECS``.
    codec: str = "h264"
    crf: int | None = None
    pix_fmt: str | None = None
    gop: int | None = None
    #: LeRobot: ``video`` (mp4 files) or ``image`` (PNG bytes in parquet).
    image_storage: str = "video"
    #: LeRobot v3.0: episodes packed per parquet / mp4 file (default: all in one).
    episodes_per_file: int | None = None
    #: Per-dimension labels recorded in ``info.json`` (``observation.velocity`` takes the state's).
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    #: Labels of ``observation.environment_state``; given exactly when the episodes carry one.
    env_state_names: tuple[str, ...] | None = None
    robot_type: str | None = None
    #: ALOHA: frames as zero-padded JPEG bytes (as the real-robot recorder stores them), at this quality.
    aloha_compressed: bool = False
    jpeg_quality: int = 95
    #: ALOHA: the task the sidecar records (the format has no per-episode task; default the folder's name).
    aloha_task: str | None = None

    def __post_init__(self) -> None:
        """Sequences as tuples, whatever the caller passed (lists from JSON, tuples from code)."""
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        for name in ("cameras", "state_names", "action_names", "env_state_names"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def video_keys(self) -> list[str]:
        return [camera_key(c) for c in self.cameras] if self.image_storage == "video" else []
