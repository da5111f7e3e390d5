"""``dinocache sim demos``: scripted transfer-cube demonstrations written as a dataset dinocache reads.

Episodes are made by :class:`~dinocache.sim.expert.ScriptedExpert` and streamed into the project's
own dataset writer (:func:`dinocache.datasets.writer.write_episodes`: LeRobot v3.0 with H.264 video,
which ``LeRobotDataset`` and ``lerobot-train`` read as it is; LeRobot v2.1; or ALOHA/ACT HDF5). With
``workers`` > 1 they are made in that many worker processes
(:func:`dinocache.sim.parallel.ordered_map`) and written here in seed order as they arrive, at most
two per worker waiting; every episode depends on its seed only, so the dataset is the same whatever
the number of workers. An episode whose replay does not reach the task's maximum reward is dropped
and counted; the kept ones are numbered 0, 1, ... contiguously. ``sim_demos.json`` beside the data
records the reset seed of every kept and failed episode, so that evaluation can prove its seeds are disjoint from them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from tqdm.auto import tqdm

from dinocache.errors import DinocacheError
from dinocache.datasets.writer import Episode, write_episodes
from dinocache.sim.env import FPS, JOINT_NAMES, demo_seeds, make_joint_env
from dinocache.sim.expert import Rollout, ScriptedExpert
from dinocache.sim.parallel import default_workers, ordered_map

#: The language instruction recorded as every episode's task.
TASK_TEXT = {"transfer_cube": "pick up the red cube with the right arm and hand it over to the left arm"}
#: Where a demonstration dataset records how it was made (the dataset's root folder).
DEMOS_RECORD = "sim_demos.json"
DEFAULT_IMAGE_SIZE = (240, 320)  # ALOHA's 480x640 halved: the same 3:4 view, a quarter of the pixels
DEMO_FORMATS = ("lerobot-v3.0", "lerobot-v2.1", "aloha-hdf5")


@dataclass
class DemoSummary:
    """What ``sim demos`` made: how many tried, kept, failed (with their seeds and best rewards)."""

    out: Path
    dataset_format: str
    task: str
    attempted: int
    seeds: list[int] = field(default_factory=list)
    failed: list[dict[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    cameras: dict[str, list[int]] = field(default_factory=dict)
    workers: int = 1

    @property
    def kept(self) -> int:
        return len(self.seeds)

    def to_json(self) -> dict:
        record = asdict(self)
        record["out"] = str(self.out)
        record["kept"] = self.kept
        record["success_rate"] = self.kept / self.attempted if self.attempted else 0.0
        record["fps"] = FPS
        record["seed_scheme"] = "episode i of `sim demos --seed S` resets the cube with seed S + i"
        record["versions"] = {name: version(name) for name in ("mujoco", "dm-control", "gym-aloha")}
        return record

    def format(self) -> str:
        rate = 100 * self.kept / max(self.attempted, 1)
        lines = [f"wrote {self.dataset_format} dataset -> {self.out}",
                 f"kept {self.kept}/{self.attempted} scripted episodes ({rate:.0f}% successful) in "
                 f"{self.seconds:.0f} s ({self.seconds / max(self.attempted, 1):.1f} s per episode, "
                 f"{self.workers} worker{'s' if self.workers > 1 else ''})"]
        if self.failed:
            lines.append(f"{len(self.failed)} failed and were left out (seed: best reward): " +
                         ", ".join(f"{f['seed']}: {f['max_reward']}" for f in self.failed))
        else:
            lines.append("none failed")
        return "\n".join(lines)


def generate_demos(out: Path | str, *, task: str = "transfer_cube", episodes: int = 50, seed: int = 0,
                   cameras: Sequence[str] = ("top",), image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                   format: str = "lerobot-v3.0", workers: int | None = None, progress: bool = True) -> DemoSummary:
    """Make ``episodes`` scripted demonstrations (reset seeds ``seed``, ``seed + 1``, ...) and write the successful ones.

    ``workers``: processes making episodes (default: one per available core, at most ``episodes``;
    1: all in this process).
    """
    out = Path(out)
    if format not in DEMO_FORMATS:
        raise DinocacheError(f"--format must be one of {', '.join(DEMO_FORMATS)}, got {format!r}")
    if task not in TASK_TEXT:
        raise DinocacheError(f"unknown task {task!r}; available: {', '.join(TASK_TEXT)}")
    if episodes < 1:
        raise DinocacheError(f"--episodes must be at least 1, got {episodes}")
    if out.exists() and any(out.iterdir()):
        raise DinocacheError(f"{out} exists and is not empty; choose another --out")
    size = (int(image_size[0]), int(image_size[1]))
    views = {cam: size for cam in cameras}
    try:
        make_joint_env(views, task)  # here, so that a wrong camera is one line and not a worker's traceback
    except ValueError as err:
        raise DinocacheError(str(err)) from None
    workers = default_workers(episodes) if workers is None else max(1, min(workers, episodes))
    summary = DemoSummary(out=out, dataset_format=format, task=task, attempted=episodes,
                          cameras={cam: list(size) for cam in cameras}, workers=workers)
    seeds = demo_seeds(seed, episodes)
    started = time.perf_counter()
    rollouts = ordered_map(ScriptedExpert, (views, task), "demonstrate", seeds, workers)
    write_episodes(out, _successful(rollouts, summary, progress), format=format,
                   fps=FPS, image_size=size, cameras=tuple(cameras), state_dim=len(JOINT_NAMES),
                   action_dim=len(JOINT_NAMES), state_names=JOINT_NAMES, action_names=JOINT_NAMES,
                   robot_type="aloha", aloha_task=TASK_TEXT[task])
    summary.seconds = time.perf_counter() - started
    (out / DEMOS_RECORD).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _successful(rollouts: Iterator[Rollout], summary: DemoSummary, progress: bool) -> Iterator[Episode]:
    """The rollouts in seed order: yield the successful episodes, numbered contiguously, and record the rest."""
    bar = tqdm(rollouts, total=summary.attempted, desc="scripted demos", unit="ep", disable=not progress, dynamic_ncols=True)
    for rollout in bar:
        seed = rollout.seed
        if rollout.success:
            summary.seeds.append(seed)
            yield Episode(index=summary.kept - 1, task=TASK_TEXT[summary.task], frames=rollout.frames,
                                   state=rollout.qpos, velocity=rollout.qvel, action=rollout.action,
                                   env_state=None)
        else:
            summary.failed.append({"seed": seed, "max_reward": rollout.max_reward})
        bar.set_postfix(kept=summary.kept, failed=len(summary.failed))
    if not summary.seeds:
        raise DinocacheError(f"all {summary.attempted} scripted episodes failed; no dataset written")


def recorded_demo_seeds(dataset: Path | str) -> list[int] | None:
    """Every reset seed a ``sim demos`` dataset tried (kept or failed), or None if it has no record."""
    record = Path(dataset) / DEMOS_RECORD
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    return sorted([*data["seeds"], *(f["seed"] for f in data["failed"])])
