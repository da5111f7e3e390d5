"""The one dataset writer: episodes from any generator to LeRobot v2.1, LeRobot v3.0 or ALOHA HDF5.

The synthetic sample scene (:mod:`~dinocache.datasets.synthetic`) and the simulator's scripted
demonstrations both write through :func:`write_episodes`, so a dataset looks the same on disk
whatever made its frames, and the readers are tested against the files users get.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dinocache.datasets.aloha_writer import write_aloha
from dinocache.datasets.base import FORMATS
from dinocache.datasets.encode import VIDEO_CODECS
from dinocache.datasets.episode import Episode, WriteSpec
from dinocache.datasets.lerobot_writer import write_lerobot_v21, write_lerobot_v30

__all__ = ["Episode", "WriteSpec", "write_episodes"]

_WRITERS = {"lerobot-v2.1": write_lerobot_v21, "lerobot-v3.0": write_lerobot_v30, "aloha-hdf5": write_aloha}


def write_episodes(out: Path | str, episodes: Iterable[Episode], *, format: str, **options: Any) -> Path:
    """Write ``episodes`` (consumed one at a time) to the empty or absent folder ``out``; return its path.

    Args:
        format: ``lerobot-v2.1``, ``lerobot-v3.0`` or ``aloha-hdf5``.
        options: the fields of :class:`WriteSpec` (``fps``, ``image_size``, ``cameras``, ``state_dim``,
            ``action_dim`` required), checked against the format before anything is written.
    """
    spec = WriteSpec(**options)
    _check(format, spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    _WRITERS[format](out, episodes, spec)
    return out


def _check(format: str, spec: WriteSpec) -> None:
    """Refuse options the format cannot hold, rather than drop them silently."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if spec.image_storage not in ("video", "image"):
        raise ValueError(f"image_storage must be 'video' or 'image', got {spec.image_storage!r}")
    if format == "aloha-hdf5" and (spec.env_state_names is not None or spec.image_storage != "video"):
        raise ValueError("ALOHA HDF5 has neither an environment state nor an image_storage choice")
    if spec.aloha_compressed and format != "aloha-hdf5":
        raise ValueError("aloha_compressed only applies to format='aloha-hdf5'")
    if spec.codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {spec.codec!r}")
