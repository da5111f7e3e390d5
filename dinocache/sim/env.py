"""The ALOHA transfer-cube scene, built directly as dm_control environments from gym-aloha's assets.

Two environments share one scene:

* the **mocap** (end-effector) version, where each gripper is welded to a mocap body that the
  scripted expert moves; used only to plan, never rendered;
* the **joint** version with position-controlled joints, which is what the real ALOHA and a policy
  control: demonstrations are replayed in it (and recorded), and policies are evaluated in it.

gym-aloha's gym wrapper only exposes the joint version, renders three 640x480 cameras with shadows
at every step (about 6 steps/s on a CPU), and passes the cube pose through a module global. Here the
tasks are subclassed so that the cube pose is given per reset, from an explicit seed, and only the
cameras a dataset or a policy needs are rendered, at its size, with shadows off (about 13x faster).
"""

from __future__ import annotations

import dinocache.sim  # noqa: F401  (sets MUJOCO_GL before dm_control is imported)

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec


def _load_triton_before_mesa() -> None:
    """Load Triton's LLVM before Mesa's software renderer loads its own.

    Both link LLVM. When Mesa's (llvmpipe, behind EGL on a machine without a GPU driver) is loaded
    first, loading ``libtriton.so`` afterwards, which torch does lazily on ``torch.export.load`` or
    ``torch._dynamo``, kills the process with a segmentation fault; in the other order both work.
    """
    if find_spec("triton") is not None:
        importlib.import_module("triton")


_load_triton_before_mesa()

import numpy as np  # noqa: E402
from dm_control import mujoco  # noqa: E402
from dm_control.rl import control  # noqa: E402
from dm_control.suite import base  # noqa: E402
from gym_aloha.constants import ASSETS_DIR, DT, JOINTS, START_ARM_POSE  # noqa: E402
from gym_aloha.tasks.sim import TransferCubeTask  # noqa: E402
from gym_aloha.tasks.sim_end_effector import TransferCubeEndEffectorTask  # noqa: E402
from gym_aloha.utils import sample_box_pose  # noqa: E402

#: Control rate of ALOHA (and of every recorded dataset): 50 Hz.
FPS = round(1 / DT)
#: Steps of one episode: 8 s at 50 Hz, as in ACT and gym-aloha.
EPISODE_STEPS = 400
#: The 14 joint names of state and action (left arm 6 + gripper, right arm 6 + gripper).
JOINT_NAMES: tuple[str, ...] = tuple(JOINTS)
#: Reward of a completed transfer: the left gripper holds the cube off the table.
MAX_REWARD = 4
#: What each reward level of gym-aloha's transfer-cube task means.
REWARD_STAGES: dict[str, int] = {"touched": 1, "lifted": 2, "transfer_attempted": 3, "transferred": 4}
#: The weld's torque scale that makes the mocap bodies actually turn the grippers. MuJoCo 3 added this
#: field (eq_data[10], default 1); at 1 the weld is too weak to hold the wrist orientation and about
#: 4 in 5 scripted transfers fail, at 3.75 they succeed.
MOCAP_WELD_TORQUE_SCALE = 3.75
_WELD_TORQUE_SCALE_INDEX = 10
TASKS = ("transfer_cube",)

Cameras = Mapping[str, tuple[int, int]]  # short camera name -> (height, width)


#: Evaluation reset seeds start here, so they never meet demonstration seeds (which count up from the
#: ``--seed`` of ``sim demos``, 0 by default): eval ``--seed s`` uses cube seeds EVAL_SEED_OFFSET + s, ....
EVAL_SEED_OFFSET = 1_000_000


def demo_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seeds of ``sim demos --seed seed --episodes episodes``: seed, seed + 1, ..."""
    return list(range(seed, seed + episodes))


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seeds of ``sim eval --seed seed --episodes episodes``, disjoint from any demo seeds below 10^6."""
    return list(range(EVAL_SEED_OFFSET + seed, EVAL_SEED_OFFSET + seed + episodes))


def cube_pose(seed: int) -> np.ndarray:
    """The cube's initial pose (x, y, z, quaternion) for a reset seed.

    gym-aloha's own sampler with an explicit seed, so seed ``s`` puts the cube where
    ``gym_aloha`` ``env.reset(seed=s)`` does.
    """
    return np.asarray(sample_box_pose(seed), dtype=np.float64)


class _SeededCube:
    """Mixin: place the cube at :attr:`cube` (set before each reset) instead of a global or a fresh draw."""

    cube: np.ndarray | None = None

    def _place_cube(self, physics: mujoco.Physics) -> None:
        if self.cube is None:
            raise RuntimeError("set the cube pose (reset(env, seed)) before resetting the environment")
        joint = physics.model.name2id("red_box_joint", "joint")
        start = physics.model.jnt_qposadr[joint]
        physics.data.qpos[start:start + 7] = self.cube


class JointTask(_SeededCube, TransferCubeTask):
    """Joint-position control; observes qpos, qvel, the cube pose and the chosen cameras only."""

    def __init__(self, cameras: Cameras) -> None:
        super().__init__()
        self.cameras = dict(cameras)
        self._views: dict[str, mujoco.Camera] = {}

    def initialize_episode(self, physics: mujoco.Physics) -> None:
        with physics.reset_context():
            physics.named.data.qpos[:16] = START_ARM_POSE
            np.copyto(physics.data.ctrl, START_ARM_POSE)
            self._place_cube(physics)
        base.Task.initialize_episode(self, physics)

    def get_observation(self, physics: mujoco.Physics) -> dict:
        return {"qpos": self.get_qpos(physics), "qvel": self.get_qvel(physics),
                "env_state": self.get_env_state(physics),
                # MuJoCo reads pixels bottom-up and dm_control flips them with a negative-stride view;
                # a camera driver hands over an ordinary array, and torch.as_tensor refuses the view.
                "images": {name: np.ascontiguousarray(self._view(physics, name).render()) for name in self.cameras}}

    def _view(self, physics: mujoco.Physics, name: str) -> mujoco.Camera:
        """One camera object per camera, kept: ``physics.render`` builds a new scene each call (~3 ms)."""
        view = self._views.get(name)  # a task belongs to one environment, so to one physics
        if view is None:
            height, width = self.cameras[name]
            view = self._views[name] = mujoco.Camera(physics, height=height, width=width, camera_id=name)
        return view


class MocapTask(_SeededCube, TransferCubeEndEffectorTask):
    """End-effector control through the mocap welds; observes what planning needs, renders nothing."""

    def initialize_episode(self, physics: mujoco.Physics) -> None:
        self.initialize_robots(physics)
        self._place_cube(physics)
        base.Task.initialize_episode(self, physics)

    def get_observation(self, physics: mujoco.Physics) -> dict:
        return {"qpos": self.get_qpos(physics), "qvel": self.get_qvel(physics),
                "env_state": self.get_env_state(physics),
                "mocap_pose_left": np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]]),
                "mocap_pose_right": np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]]),
                "gripper_ctrl": physics.data.ctrl.copy()}


@dataclass
class SimEnv:
    """A dm_control environment and its task, reset by seed."""

    env: control.Environment
    task: _SeededCube

    def reset(self, seed: int):
        """Reset with the cube placed by ``seed`` (see :func:`cube_pose`); returns the first TimeStep."""
        self.task.cube = cube_pose(seed)
        return self.env.reset()

    def step(self, action: np.ndarray):
        return self.env.step(np.asarray(action, dtype=np.float64))

    @property
    def physics(self) -> mujoco.Physics:
        return self.env.physics


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")


def _environment(xml: str, task: base.Task) -> control.Environment:
    physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))
    # Shadow maps and 4x multisampling are the two most expensive parts of software rendering (each
    # about halves the frame rate on a CPU) and teach a policy nothing it needs.
    physics.model.vis.quality.shadowsize = 0
    physics.model.vis.quality.offsamples = 0
    return control.Environment(physics, task, time_limit=float("inf"), control_timestep=DT,
                               n_sub_steps=None, flat_observation=False)


def make_joint_env(cameras: Cameras, task: str = "transfer_cube") -> SimEnv:
    """The joint-space environment rendering ``cameras`` ({name: (height, width)}) at every step."""
    _check_task(task)
    env = _environment("bimanual_viperx_transfer_cube.xml", JointTask(cameras))
    visual = env.physics.model.vis.global_
    # The offscreen buffer must hold the largest frame asked for (the scene's default is 640x480).
    visual.offheight = max([visual.offheight, *(h for h, _ in cameras.values())])
    visual.offwidth = max([visual.offwidth, *(w for _, w in cameras.values())])
    unknown = [name for name in cameras if name not in camera_names(env.physics)]
    if unknown:
        raise ValueError(f"unknown camera(s) {unknown}; the scene has {camera_names(env.physics)}")
    return SimEnv(env, env.task)


def make_mocap_env(task: str = "transfer_cube") -> SimEnv:
    """The end-effector environment the scripted expert plans in (not rendered)."""
    _check_task(task)
    env = _environment("bimanual_viperx_end_effector_transfer_cube.xml", MocapTask())
    env.physics.model.eq_data[:, _WELD_TORQUE_SCALE_INDEX] = MOCAP_WELD_TORQUE_SCALE
    return SimEnv(env, env.task)


def camera_names(physics: mujoco.Physics) -> list[str]:
    """Every camera of the scene, by name."""
    return [physics.model.id2name(i, "camera") for i in range(physics.model.ncam)]
