"""Experiment trackers a training run can also log to: TensorBoard and Weights & Biases.

LeRobot users expect their runs in one of the two. ``metrics.jsonl`` and ``loss.png`` stay the run's
own record; a tracker receives the same records, and the run's configuration (``run.json``: the ACT
config, the store's provenance, the training options) once at the start. Both are optional extras
(``pip install 'dinocache[tensorboard]'`` / ``'dinocache[wandb]'``); asking for one that is not
installed is refused before the run starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import numbers
import os
from pathlib import Path
from typing import Any, Protocol

from dinocache.errors import TrainingError

__all__ = ["TRACKERS", "Tracker", "check_trackers", "open_trackers"]

#: ``--log-to`` choices -> the module each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


def check_trackers(kinds: tuple[str, ...]) -> None:
    """Refuse unknown trackers and those whose package is missing, in one line, before any work."""
    for kind in kinds:
        if kind not in TRACKERS:
            raise TrainingError(f"--log-to {kind}: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[kind]) is None:
            raise TrainingError(f"--log-to {kind} needs the {TRACKERS[kind]} package: pip install 'dinocache[{kind}]'")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and key != "step"}


class _TensorBoard:
    """Event files under ``<run>/tensorboard`` (``tensorboard --logdir <run>``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A Weights & Biases run named after the run folder; resuming the folder resumes the W&B run.

    Project from ``$WANDB_PROJECT`` (default ``dinocache``); ``WANDB_MODE=offline`` works as usual.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dinocache"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(kinds: tuple[str, ...], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """One tracker per kind, each given the run's configuration."""
    check_trackers(kinds)
    makers = {"tensorboard": _TensorBoard, "wandb": _Wandb}
    return [makers[kind](run_dir, config) for kind in kinds]
