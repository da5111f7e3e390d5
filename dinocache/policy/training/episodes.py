"""The store a run trains on, its episodes, the train/validation split, and the action windows.

A training sample is one store row ``t``: every camera's cached patch grid (and CLS vector) at
``t``, the normalised state at ``t``, and the normalised actions ``t .. t+chunk_size-1`` with
``action_is_pad`` marking the steps that run past the end of ``t``'s episode (LeRobot's
``delta_timestamps`` semantics; padded steps repeat the episode's last action and are masked out
of the loss and of the CVAE encoder). Validation holds out whole episodes, never frames of a
training episode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dinocache.errors import DinocacheError, StoreError
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.model.config import ACTION, OBS_STATE

__all__ = ["open_training_store", "EpisodeSplit", "split_episodes", "episode_rows", "action_windows"]


def open_training_store(path: str | os.PathLike) -> FeatureStore:
    """Open a feature store for training, refusing one whose extraction has not finished.

    Unwritten frames read as NaN; training on them would produce a NaN loss many steps later (or,
    worse, a head that learned on a silently partial dataset), so the check is done up front.
    """
    store = FeatureStore(path)
    done = store.done_units()
    if not done.all():
        missing = np.flatnonzero(~done)
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise StoreError(
            f"{store.path}: the feature store is incomplete: {len(missing)} of {len(done)} work units are not "
            f"written (units {shown}). Finish it by re-running the same `dinocache extract` command "
            f"(it resumes), then train."
        )
    for key in (OBS_STATE, ACTION):
        if key not in store.lowdim_keys:
            raise StoreError(f"{store.path}: the store has no {key!r} array; the ACT head needs state and action")
    store.check_whole()
    return store


@dataclass(frozen=True)
class EpisodeSplit:
    """Store episode indices used for training and for validation (disjoint)."""

    train: list[int]
    val: list[int]


def split_episodes(episode_indices: Sequence[int], val_episodes: str | float | Sequence[int] | None) -> EpisodeSplit:
    """Split episodes (never frames) into train and validation.

    ``val_episodes`` is a fraction (``0.1`` or ``"0.1"``: that share of the episodes, at least one
    when there are two or more, spread evenly over the recording order so that drift over a
    session is represented), a list of episode indices (``"3,17"`` or ``[3, 17]``), or
    ``None`` / ``"none"`` / ``0.0`` for no validation. The split does not depend on ``--seed``, so
    runs with different seeds are compared on the same validation episodes.

    Frames of neighbouring time steps are nearly identical; validating on frames of episodes that
    are also trained on would measure memorisation, not generalisation.
    """
    episodes = [int(e) for e in episode_indices]
    if isinstance(val_episodes, str):
        text = val_episodes.strip().lower()
        if text in ("", "none"):
            val_episodes = None
        elif "." in text:
            try:
                val_episodes = float(text)
            except ValueError:
                raise DinocacheError(f"--val-episodes {val_episodes!r}: expected a fraction like 0.1, "
                                     f"a comma list of episode indices like 3,17, or none") from None
        else:
            try:
                val_episodes = [int(t) for t in text.split(",") if t.strip()]
            except ValueError:
                raise DinocacheError(f"--val-episodes {val_episodes!r}: expected a fraction like 0.1, "
                                     f"a comma list of episode indices like 3,17, or none") from None
    if val_episodes is None:
        chosen: list[int] = []
    elif isinstance(val_episodes, float):
        if not 0.0 <= val_episodes < 1.0:
            raise DinocacheError(f"--val-episodes {val_episodes}: a fraction must be in [0, 1)")
        count = 0 if val_episodes == 0.0 or len(episodes) < 2 else max(1, round(val_episodes * len(episodes)))
        positions = ((np.arange(count) + 0.5) * len(episodes) / max(count, 1)).astype(int)
        chosen = [episodes[p] for p in positions]
    else:
        chosen = sorted({int(e) for e in val_episodes})
        unknown = sorted(set(chosen) - set(episodes))
        if unknown:
            raise DinocacheError(f"--val-episodes: episode(s) {unknown} are not in the store "
                                 f"(it has {len(episodes)} episodes, {min(episodes)}..{max(episodes)})")
    val = set(chosen)
    train = [e for e in episodes if e not in val]
    if not train:
        raise DinocacheError("--val-episodes leaves no episode to train on")
    return EpisodeSplit(train=train, val=[e for e in episodes if e in val])


def episode_rows(episodes: Sequence[tuple[int, int, int, str]], chosen: Sequence[int]) -> np.ndarray:
    """Sorted store rows of every frame of the ``chosen`` episode indices."""
    wanted = set(int(e) for e in chosen)
    parts = [np.arange(start, start + length) for index, start, length, _ in episodes if index in wanted]
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def action_windows(rows: Tensor, episode_end: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Rows of the actions ``t .. t+chunk_size-1`` for each row ``t``, and where they are padding.

    ``episode_end[t]`` is one past the last row of ``t``'s episode. Window positions at or past it are
    padding: their row is clamped to the episode's last frame (so the gather never crosses into
    the next episode) and ``is_pad`` is True. Returns ``(windows, is_pad)``, both ``(B, chunk_size)``.
    """
    windows = rows.unsqueeze(1) + torch.arange(chunk_size, dtype=rows.dtype, device=rows.device)
    end = episode_end.index_select(0, rows).unsqueeze(1)
    is_pad = windows >= end
    return torch.minimum(windows, end - 1), is_pad
