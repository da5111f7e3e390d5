"""The synthetic sample scene, written in every supported format: for tests, benchmarks and the demo.

The scene: a coloured disc glides over a per-camera gradient background along a smooth
Lissajous path; its radius opens and closes like a gripper; a pale square marks a fixed goal.
The state is what the camera shows (disc x, y, gripper opening, then "joint" values that are
fixed non-linear functions of those, as joint angles are of an end-effector pose); the action
is the state a few frames ahead. So the actions really depend on the pixels and a policy
trained on frozen image features can learn them.

Everything is a deterministic function of ``seed`` and the episode index: the same call writes
identical frames and arrays in LeRobot v2.1, LeRobot v3.0 and ALOHA HDF5 (through the one
:mod:`~dinocache.datasets.writer`), so tests can check that the three readers agree (up to codec
loss for mp4 and JPEG).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dinocache.datasets.episode import Episode
from dinocache.datasets.writer import write_episodes

ACTION_LEAD_FRAMES = 3
_PALETTE = [("red", (220, 40, 40)), ("green", (40, 190, 70)), ("blue", (50, 80, 230)),
            ("yellow", (235, 210, 40)), ("magenta", (210, 50, 200)), ("cyan", (40, 200, 210))]
_VISIBLE_NAMES = ("disc_x", "disc_y", "grip")
_GOAL_NAMES = ("goal_x", "goal_y")


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
                      with_env_state: bool = False) -> Episode:
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
    return Episode(index=index, task=f"follow the {colour_name} disc", frames=frames,
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
    """Write the scene's episodes to the empty (or absent) folder ``out`` and return its path.

    Args:
        format: ``lerobot-v2.1``, ``lerobot-v3.0`` or ``aloha-hdf5``.
        episode_length: one length for all episodes, or one per episode.
        image_size: ``(height, width)``.
        with_env_state: also record the goal's position as ``observation.environment_state``.
        episodes_per_file: LeRobot v3.0 only (default: all in one file).

    ``codec``, ``crf``, ``pix_fmt``, ``gop``, ``image_storage``, ``aloha_compressed`` and
    ``jpeg_quality`` go to the writer as they are (see :class:`~dinocache.datasets.episode.WriteSpec`).
    """
    lengths = ([int(episode_length)] * num_episodes if isinstance(episode_length, int)
               else [int(n) for n in episode_length])
    if len(lengths) != num_episodes:
        raise ValueError(f"{len(lengths)} episode lengths for {num_episodes} episodes")
    episodes = (synthetic_episode(i, n, image_size=tuple(image_size), cameras=tuple(cameras), fps=fps,
                                  state_dim=state_dim, action_dim=action_dim, seed=seed,
                                  with_env_state=with_env_state)
                for i, n in enumerate(lengths))
    return write_episodes(
        out, episodes, format=format, fps=fps, image_size=image_size, cameras=cameras, state_dim=state_dim,
        action_dim=action_dim, codec=codec, crf=crf, pix_fmt=pix_fmt, gop=gop, image_storage=image_storage,
        episodes_per_file=episodes_per_file or num_episodes, state_names=_scene_names(state_dim),
        action_names=_scene_names(action_dim), env_state_names=_GOAL_NAMES if with_env_state else None,
        robot_type="synthetic_disc", aloha_compressed=aloha_compressed, jpeg_quality=jpeg_quality,
        aloha_task="follow the coloured disc")


def _scene_names(dim: int) -> tuple[str, ...]:
    """Labels of the first ``dim`` dimensions of the state or action: what the camera shows, then joints."""
    return tuple(_VISIBLE_NAMES[i] if i < len(_VISIBLE_NAMES) else f"joint_{i}" for i in range(dim))
