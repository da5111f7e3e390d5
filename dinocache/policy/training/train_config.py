"""What ``dinocache train`` is asked to do, as one dataclass (LeRobot keeps its configs apart from its loops).

It imports no torch, so that the command line can take its defaults and answer ``--help`` at once.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinocache.errors import TrainingError
from dinocache.policy.training.tracking import check_trackers

__all__ = ["TrainConfig", "VIEW_SAMPLING", "AUGMENT_OPTIONS"]

#: ``--view-sampling``: a uniformly drawn view per sample, or view 0 (the clean frame) only.
VIEW_SAMPLING = ("uniform", "clean")
#: The options of augmentation on the cache, and what a run recorded before they existed had.
AUGMENT_OPTIONS = {"view_sampling": "uniform", "grid_shift": 0, "patch_dropout": 0.0}


@dataclass
class TrainConfig:
    """Everything ``dinocache train`` is asked to do (see ``--help`` and ``docs/training.md``).

    ``batch_size``, ``seed``, ``val_episodes``, ``val_frames``, ``preset`` and ``act`` define the run:
    on ``resume`` the recorded values are used, and a value the user gave must agree with the record,
    whatever it is. ``given`` names the fields the user gave (the command line knows, from click's
    parameter source); left None (the Python API, where an argument equal to its default cannot be
    told from an omitted one), the fields that differ from their defaults count as given. The other
    fields may change between a run and its resumption.

    Values are checked when the config is made, so that a meaningless one (``batch_size=0``) is
    refused before any folder exists.
    """

    store: Path
    out: Path
    steps: int = 100_000
    batch_size: int = 8  # per process
    preset: str | None = None
    act: dict[str, Any] = field(default_factory=dict)  # ACTConfig fields to override (after the preset's)
    val_episodes: str | float | list[int] | None = "0.1"
    val_frames: int = 2048
    eval_every: int = 1000
    save_every: int = 20_000
    log_every: int = 100
    seed: int = 1000
    device: str | None = None
    compile: bool = False
    cuda_graph: bool = True
    memory_budget: str | int | None = None
    device_memory_budget: str | int | None = None
    window_frames: int | None = None
    resume: bool = False
    progress: bool = True
    log_to: tuple[str, ...] = ()  # experiment trackers besides metrics.jsonl: "tensorboard", "wandb"
    # Augmentation on the cache (dinocache.policy.training.feature_augment); they define the run, like batch_size.
    view_sampling: str = "uniform"  # with a store of views: one drawn per sample, or "clean" (view 0 only)
    grid_shift: int = 0  # patches the grid may move in each direction, edges replicated
    patch_dropout: float = 0.0  # chance of zeroing each patch
    given: frozenset[str] | None = None

    def __post_init__(self) -> None:
        minimum = {"steps": 1, "batch_size": 1, "val_frames": 0, "eval_every": 1, "save_every": 1, "log_every": 1,
                   "seed": 0, "grid_shift": 0}
        if self.window_frames is not None:
            minimum["window_frames"] = 1
        for name, least in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise TrainingError(f"--{name.replace('_', '-')} {value}: must be a whole number of at least {least}")

        self.log_to = tuple(self.log_to)
        check_trackers(self.log_to)
        if self.view_sampling not in VIEW_SAMPLING:
            raise TrainingError(f"--view-sampling {self.view_sampling!r}: choose {' or '.join(VIEW_SAMPLING)}")
        if not isinstance(self.patch_dropout, numbers.Real) or not 0.0 <= self.patch_dropout < 1.0:
            raise TrainingError(f"--patch-dropout {self.patch_dropout}: must be a probability in [0, 1)")

    def refuse_feature_augmentation(self, run: str) -> None:
        """Refuse, in one line, augmentation of cached features for a ``run`` that trains on decoded frames."""
        given = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name, default in AUGMENT_OPTIONS.items()
                 if getattr(self, name) != default]
        if given:
            raise TrainingError(f"{', '.join(given)}: these augment cached features; {run} trains on decoded frames, "
                                "where they do not apply")

    def is_given(self, name: str) -> bool:
        """Whether the user set the field ``name`` (see the class docstring)."""
        return self.gave(name, getattr(self, name), getattr(TrainConfig(store=self.store, out=self.out), name))

    def gave(self, name: str, value: Any, default: Any) -> bool:
        """Whether the user set option ``name`` (a field, or another option of the command, such as
        ``--backbone``) to ``value``: named in ``given``, or, without it, ``value`` is not ``default``."""
        return name in self.given if self.given is not None else value != default
