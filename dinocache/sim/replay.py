"""A stand-in policy that replays the scripted expert's joint plans through ``sim eval``'s loop.

It answers :func:`~dinocache.sim.evaluate.run_episodes` like an exported policy does (batched, one
episode per environment) but costs nothing, so it measures the simulator alone
(``benchmarks/bench_sim.py``) and gives the evaluation loop episodes whose outcome is known (the
tests): the expert's plan for a seed transfers the cube, a tampered one need not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dinocache.keys import CAMERA_PREFIX
from dinocache.sim.env import FPS, JOINT_NAMES, Cameras


class PlanReplay:
    """Episode ``k`` (the ``k``-th :meth:`reset`, as episodes start in seed order) gets ``plans[k]``, step by step."""

    def __init__(self, plans: Sequence[np.ndarray], cameras: Cameras) -> None:
        self.plans = list(plans)
        keys = [CAMERA_PREFIX + name for name in cameras]
        self.metadata = {"cameras": keys, "image_size": {CAMERA_PREFIX + n: list(s) for n, s in cameras.items()},
                         "state_dim": len(JOINT_NAMES), "action_dim": len(JOINT_NAMES), "fps": FPS}
        self.started = 0
        self.playing: dict[int | None, list[int]] = {}  # environment -> [episode, step]
        #: How many environments each call asked for: one call per control step, batched.
        self.batches: list[int] = []

    def reset(self, env: int | None = None) -> None:
        self.playing[env] = [self.started, 0]
        self.started += 1

    def select_actions(self, observations: Sequence[Mapping[str, np.ndarray]], envs: Sequence[int]) -> np.ndarray:
        self.batches.append(len(envs))
        actions = []
        for env in envs:
            episode, step = self.playing[env]
            actions.append(self.plans[episode][step])
            self.playing[env][1] += 1
        return np.stack(actions)
