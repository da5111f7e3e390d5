"""``dinocache sim eval``: run an exported policy closed loop in the simulator and measure how often it succeeds.

The policy is the fused ``.pt2`` program (:func:`dinocache.load_policy`): it gets exactly what a robot
would give it, the raw camera frames at the size the dataset was recorded at and the 14 joint
positions, and answers one 14-D joint target per 50 Hz step, with temporal ensembling or the action
queue as it was configured when trained. Nothing from training is reused here: the cube is placed by
evaluation seeds that no demonstration uses (:func:`dinocache.sim.env.eval_seeds`).

An episode succeeds when the task's reward reaches its maximum (the left gripper holds the cube off the
table, ACT's and gym-aloha's definition); it then ends early, otherwise after ``max_steps``.

Episodes run ``num_envs`` at a time in a :class:`~dinocache.sim.vector.EnvPool` (environments in
worker processes, since stepping and rendering are CPU-bound): each control step the policy is
queried once for every running environment (:meth:`PolicyRuntime.select_actions`, which keeps the
action queue or temporal ensemble per environment), and an environment whose episode ends takes the
next seed while the others carry on. With two *waves* the environments are two halves that take
turns: the policy answers one half while the workers step and render the other, so neither waits
for the other (on a GPU host the query and the rendering take similar times). An episode's outcome depends only on its seed and the actions it
gets, so it is the one-at-a-time evaluation's as long as the model answers a row the same in a batch
as alone (exactly so for row-wise programs; a real network on a CPU may differ in the last bits, as
its kernels block a batch differently). The success rate comes with a Wilson score 95 % interval, which stays inside [0, 1] and is honest at 0/50
or 50/50 where the normal approximation collapses to a zero-width interval.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from dinocache.errors import DinocacheError
from dinocache.keys import CAMERA_PREFIX, OBS_STATE
from dinocache.datasets.encode import encode_video
from dinocache.sim.env import EPISODE_STEPS, FPS, JOINT_NAMES, MAX_REWARD, REWARD_STAGES, eval_seeds
from dinocache.sim.parallel import default_workers
from dinocache.sim.vector import EnvPool, Transition

RESULTS_FILE = "results.json"
VIDEO_DIR = "videos"
Z_95 = 1.959963984540054


class Policy(Protocol):
    """What :func:`dinocache.load_policy` returns, as far as closed-loop control needs it."""

    metadata: Mapping[str, Any]

    def reset(self, env: int | None = None) -> None: ...

    def select_actions(self, observations: Sequence[Mapping[str, np.ndarray]], envs: Sequence[int]) -> np.ndarray: ...


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    # At 0/n and n/n the bound is exactly 0 or 1; the formula leaves a rounding residue there.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == trials else min(1.0, centre + half))


@dataclass
class EpisodeResult:
    """One rollout: its reset seed, the best reward it reached and how long it ran."""

    seed: int
    max_reward: int
    steps: int
    seconds: float
    video: str | None = None

    @property
    def success(self) -> bool:
        return self.max_reward >= MAX_REWARD


@dataclass
class EvalResult:
    """Every rollout of one evaluation and what they add up to."""

    policy: str
    task: str
    seed: int
    max_steps: int
    episodes: list[EpisodeResult] = field(default_factory=list)
    seconds: float = 0.0
    policy_metadata: dict[str, Any] = field(default_factory=dict)
    demo_seeds_checked: bool = False
    num_envs: int = 1
    workers: int = 0
    waves: int = 1

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes) if self.episodes else 0.0

    def stages(self) -> dict[str, float]:
        """Fraction of episodes that reached each reward stage (touched, lifted, ..., transferred)."""
        n = max(len(self.episodes), 1)
        return {name: sum(e.max_reward >= level for e in self.episodes) / n for name, level in REWARD_STAGES.items()}

    def to_json(self) -> dict[str, Any]:
        low, high = wilson_interval(self.successes, len(self.episodes))
        steps = sum(e.steps for e in self.episodes)
        return {
            "task": self.task, "policy": self.policy, "episodes": len(self.episodes),
            "successes": self.successes, "success_rate": self.success_rate,
            "ci95": [low, high], "ci_method": "Wilson score interval",
            "success_definition": f"reward reached {MAX_REWARD}: the left gripper holds the cube off the table",
            "stages": self.stages(), "stage_rewards": REWARD_STAGES,
            "seed": self.seed, "eval_seeds": [e.seed for e in self.episodes],
            "seed_scheme": "episode i of `sim eval --seed S` resets the cube with seed 1000000 + S + i; "
                           "`sim demos --seed S` uses S + i",
            "demo_seeds_checked_disjoint": self.demo_seeds_checked,
            "max_steps": self.max_steps, "fps": FPS, "seconds": self.seconds,
            "num_envs": self.num_envs, "workers": self.workers, "waves": self.waves,
            "steps_per_s": steps / self.seconds if self.seconds else None,
            "policy_metadata": self.policy_metadata,
            "per_episode": [{**asdict(e), "success": e.success} for e in self.episodes],
            "videos": [e.video for e in self.episodes if e.video],
            "versions": {name: version(name) for name in ("mujoco", "dm-control", "gym-aloha")},
        }

    def format(self) -> str:
        low, high = wilson_interval(self.successes, len(self.episodes))
        stages = "  ".join(f"{name} {100 * v:.0f}%" for name, v in self.stages().items())
        return "\n".join([
            f"success     {self.successes}/{len(self.episodes)} = {100 * self.success_rate:.1f}% "
            f"(95% CI {100 * low:.1f}-{100 * high:.1f}%)",
            f"stages      {stages}",
            f"time        {self.seconds:.0f} s ({self.seconds / max(len(self.episodes), 1):.1f} s per episode)"])


def camera_sizes(metadata: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """{short camera name: (height, width)} the policy expects, from its metadata.

    ``image_size`` may be one (H, W) for all cameras, a list aligned with ``cameras``, or a mapping by
    camera key (full or short).
    """
    cameras = [str(c) for c in metadata["cameras"]]
    sizes = metadata["image_size"]
    short = [c.removeprefix(CAMERA_PREFIX) for c in cameras]
    if isinstance(sizes, Mapping):
        picked = [sizes.get(full, sizes.get(name)) for full, name in zip(cameras, short)]
    elif len(sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in sizes):
        picked = [sizes] * len(cameras)
    else:
        picked = list(sizes)
    if len(picked) != len(cameras) or any(p is None or len(p) != 2 for p in picked):
        raise DinocacheError(f"policy metadata: cannot read an (H, W) per camera from image_size={sizes!r}")
    return {name: (int(p[0]), int(p[1])) for name, p in zip(short, picked)}


def check_policy(metadata: Mapping[str, Any]) -> None:
    """Refuse a policy that cannot drive the 14-joint ALOHA at 50 Hz, in one line."""
    dims = len(JOINT_NAMES)
    if metadata.get("state_dim") != dims or metadata.get("action_dim") != dims:
        raise DinocacheError(f"the policy maps a {metadata.get('state_dim')}-D state to {metadata.get('action_dim')}-D "
                             f"actions; ALOHA transfer-cube needs {dims} and {dims}: train it on `sim demos` data")
    fps = metadata.get("fps")
    if fps is not None and abs(float(fps) - FPS) > 1e-6:
        raise DinocacheError(f"the policy was trained on {fps} fps data; the simulator runs at {FPS} Hz")


@dataclass
class _Running:
    """The episode an environment is running: which one, since when, how far it got, its video frames."""

    index: int
    seed: int
    started: float
    frames: list[np.ndarray] | None
    best: int = 0
    steps: int = 0


def _observation(shown: Transition) -> dict[str, np.ndarray]:
    """What the policy gets from an environment: every camera frame and the joint positions."""
    observation = {CAMERA_PREFIX + cam: image for cam, image in shown.images.items()}
    observation[OBS_STATE] = shown.qpos.astype(np.float32)
    return observation


def run_episodes(policy: Policy, seeds: Sequence[int], *, task: str = "transfer_cube",
                 max_steps: int = EPISODE_STEPS, out: Path | None = None, videos: int = 3, num_envs: int = 1,
                 workers: int = 0, waves: int = 1, progress: bool = True) -> list[EpisodeResult]:
    """Roll ``policy`` out once per seed, ``num_envs`` episodes at a time in ``workers`` processes.

    ``waves``: groups the environments are split into, which take turns (2: while one half steps
    and renders in the workers, the policy is queried for the other half, so neither the workers
    nor the policy wait for each other; each half's query is batched). Slot ``s`` is in wave
    ``(s // workers) % waves``, so every worker holds environments of every wave. Results come back
    in seed order; mp4s of the first ``videos`` rollouts go to ``out/videos``. ``num_envs=1,
    workers=0`` is the plain loop: one episode after the other in this process.
    """
    check_policy(policy.metadata)
    sizes = camera_sizes(policy.metadata)
    video_camera = next(iter(sizes))
    queue = iter(enumerate(seeds))
    results: dict[int, EpisodeResult] = {}  # by episode index, as the episodes end
    running: dict[int, _Running] = {}
    shown: dict[int, Transition] = {}
    try:
        pool = EnvPool(sizes, task, max(1, min(num_envs, len(seeds))), workers)
    except ValueError as err:
        raise DinocacheError(f"policy cameras: {err}") from None
    waves = max(1, min(waves, pool.num_envs))
    wave_of = [(slot // max(pool.workers, 1)) % waves for slot in range(pool.num_envs)]

    def start(slots: Sequence[int]) -> None:
        """Give each free slot the next seed, if any is left; reset its environment and its policy state."""
        seeds_by_slot = {}
        for slot, (index, seed) in zip(slots, queue):
            keep_frames = out is not None and index < videos
            running[slot] = _Running(index, seed, time.perf_counter(), [] if keep_frames else None)
            seeds_by_slot[slot] = seed
            policy.reset(slot)
        shown.update(pool.reset(seeds_by_slot))

    def act(wave: int) -> tuple[list[int], int] | None:
        """Query the policy for the wave's running environments and start stepping them (None: none runs)."""
        slots = sorted(slot for slot in running if wave_of[slot] == wave)
        if not slots:
            return None
        actions = policy.select_actions([_observation(shown[slot]) for slot in slots], slots)
        for slot in slots:
            if running[slot].frames is not None:
                running[slot].frames.append(shown[slot].images[video_camera])
        return slots, pool.submit_step(dict(zip(slots, actions)))

    bar = tqdm(total=len(seeds), desc="closed-loop eval", unit="ep", disable=not progress, dynamic_ncols=True)
    with pool, bar:
        start(range(pool.num_envs))
        in_flight = {wave: act(wave) for wave in range(waves)}
        while any(in_flight.values()):
            for wave, stepping in in_flight.items():
                if stepping is None:
                    continue
                slots, ticket = stepping
                shown.update(pool.result(ticket))
                ended = []
                for slot in slots:
                    episode = running[slot]
                    episode.steps += 1
                    episode.best = max(episode.best, int(shown[slot].reward))
                    if episode.best >= MAX_REWARD or episode.steps >= max_steps:
                        ended.append(slot)
                        results[episode.index] = _finish(running.pop(slot), out)
                if ended:
                    wins = sum(r.success for r in results.values())
                    bar.update(len(ended))
                    bar.set_postfix(success=f"{wins}/{len(results)} ({100 * wins / len(results):.0f}%)")
                    start(ended)
                in_flight[wave] = act(wave)
    return [results[index] for index in range(len(seeds))]


def _finish(episode: _Running, out: Path | None) -> EpisodeResult:
    result = EpisodeResult(seed=episode.seed, max_reward=episode.best, steps=episode.steps,
                           seconds=time.perf_counter() - episode.started)
    if episode.frames:
        name = f"rollout_{episode.index:03d}_seed_{episode.seed}.mp4"
        result.video = str(_write_video(Path(out) / VIDEO_DIR / name, episode.frames))
    return result


def _write_video(path: Path, frames: list[np.ndarray]) -> Path:
    """A rollout as an H.264 mp4 that browsers play (yuv420p needs even sides, else full chroma)."""
    height, width = frames[0].shape[:2]
    even = height % 2 == 0 and width % 2 == 0
    encode_video(path, frames, FPS, "h264", crf=23, pix_fmt="yuv420p" if even else None)
    return path


def evaluate(policy_path: Path | str, *, task: str = "transfer_cube", episodes: int = 50, seed: int = 0,
             max_steps: int = EPISODE_STEPS, out: Path | str | None = None, videos: int = 3,
             device: str | None = None, demos: Path | str | None = None, num_envs: int | None = None,
             workers: int | None = None, waves: int | None = None, progress: bool = True) -> EvalResult:
    """Load an exported policy and evaluate it on ``episodes`` held-out reset seeds; write ``out/results.json``.

    ``demos``: the demonstration dataset the policy was trained on; when given, its recorded seeds are
    checked to be disjoint from the evaluation seeds. ``num_envs``: episodes run at a time (default:
    two per available core, at most ``episodes``; one on a single core); ``workers``: processes
    stepping them (default: one per available core, at most ``num_envs``; 0 with ``num_envs=1``: one
    episode at a time, in this process); ``waves``: see :func:`run_episodes` (default: 2 where every
    worker holds at least two environments, else 1).
    """
    from dinocache import load_policy
    from dinocache.sim.demos import DEMOS_RECORD, recorded_demo_seeds

    if episodes < 1:
        raise DinocacheError(f"--episodes must be at least 1, got {episodes}")
    seeds = eval_seeds(seed, episodes)
    checked = False
    if demos is not None:
        used = recorded_demo_seeds(demos)
        if used is None:
            raise DinocacheError(f"{demos} has no {DEMOS_RECORD}: not made by `dinocache sim demos`")
        overlap = sorted(set(used) & set(seeds))
        if overlap:
            raise DinocacheError(f"evaluation seeds {overlap[:5]} were used for demonstrations in {demos}")
        checked = True
    if num_envs is None:  # two per core: two waves, one stepping while the policy answers the other
        cores = default_workers(episodes)
        num_envs = 1 if cores == 1 else min(episodes, 2 * cores)
    num_envs = max(1, min(num_envs, episodes))
    if workers is None:
        workers = 0 if num_envs == 1 else default_workers(num_envs)
    workers = min(workers, num_envs)
    if waves is None:
        waves = 2 if 0 < workers and 2 * workers <= num_envs else 1
    policy = load_policy(policy_path, device=device or "cpu")
    result = EvalResult(policy=str(policy_path), task=task, seed=seed, max_steps=max_steps,
                        policy_metadata=_jsonable(dict(policy.metadata)), demo_seeds_checked=checked,
                        num_envs=num_envs, workers=workers, waves=waves)
    started = time.perf_counter()
    result.episodes = run_episodes(policy, seeds, task=task, max_steps=max_steps,
                                   out=Path(out) if out is not None else None, videos=videos, num_envs=num_envs,
                                   workers=workers, waves=waves, progress=progress)
    result.seconds = time.perf_counter() - started
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / RESULTS_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy scalars and arrays, tuples, paths become numbers, lists, strings)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
