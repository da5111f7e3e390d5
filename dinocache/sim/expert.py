"""The scripted transfer-cube expert: plan end-effector keyframes, record joints, replay and record.

One demonstration is made in three moves:

1. **Plan.** At reset, read the cube pose and lay out timed keyframes for each gripper (position,
   orientation, opening): the right arm approaches above the cube, descends, closes, lifts to a
   meeting point; the left arm comes to meet it, closes on the cube, the right arm lets go and both
   withdraw.
2. **Execute in the mocap scene.** The keyframes are interpolated (positions linearly, orientations by
   slerp) and drive the mocap bodies welded to the grippers; the joint positions the arms reach are
   recorded. That is inverse kinematics by physics: no IK solver, and the joint path is one the
   simulated arms can really follow.
3. **Replay in the joint scene.** The recorded joint path is sent as position targets to the
   joint-controlled robot (what a policy controls), and the cameras, qpos, qvel, actions and rewards
   are recorded. Only the replay counts: an episode is a success when the replay reaches the task's
   maximum reward, so a stored demonstration is one that the action sequence it stores achieves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gym_aloha.constants import normalize_puppet_gripper_position

from dinocache.sim.env import EPISODE_STEPS, MAX_REWARD, Cameras, SimEnv, make_joint_env, make_mocap_env

#: Where the two grippers meet to hand the cube over (metres, world frame: between the arms, above the table).
MEET_XYZ = np.array([0.0, 0.5, 0.25])
_IDENTITY = np.array([1.0, 0.0, 0.0, 0.0])


def _axis_angle(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation by ``degrees`` about ``axis``."""
    half = np.deg2rad(degrees) / 2
    return np.array([np.cos(half), *(np.sin(half) * np.asarray(axis, dtype=np.float64))])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _slerp(a: np.ndarray, b: np.ndarray, u: float) -> np.ndarray:
    dot = float(np.dot(a, b))
    if dot < 0:  # take the short way round
        b, dot = -b, -dot
    if dot > 0.9995:
        q = a + u * (b - a)
        return q / np.linalg.norm(q)
    theta = np.arccos(dot)
    return (np.sin((1 - u) * theta) * a + np.sin(u * theta) * b) / np.sin(theta)


@dataclass(frozen=True)
class Keyframe:
    """A gripper's target at step ``t``: position (m), orientation (w, x, y, z), opening (0 closed .. 1 open)."""

    t: int
    xyz: np.ndarray
    quat: np.ndarray
    gripper: float


def interpolate(keys: list[Keyframe], t: float) -> np.ndarray:
    """The mocap action (xyz, quat, gripper) at step ``t``, between the keyframes around it."""
    if t <= keys[0].t:
        k = keys[0]
        return np.concatenate([k.xyz, k.quat, [k.gripper]])
    for before, after in zip(keys, keys[1:]):
        if t <= after.t:
            u = (t - before.t) / (after.t - before.t)
            return np.concatenate([before.xyz + u * (after.xyz - before.xyz), _slerp(before.quat, after.quat, u),
                                   [before.gripper + u * (after.gripper - before.gripper)]])
    k = keys[-1]
    return np.concatenate([k.xyz, k.quat, [k.gripper]])


def plan_transfer(cube_xyz: np.ndarray, left_start: np.ndarray,
                  right_start: np.ndarray) -> tuple[list[Keyframe], list[Keyframe]]:
    """Keyframes (left, right) for handing the cube from the right gripper to the left one.

    ``*_start`` are the mocap poses (xyz + quat) at reset. The right gripper picks with its fingers
    tilted 60 degrees down about the y axis; the left one receives with its fingers turned 90 degrees
    about x, so the two grasps are crosswise and the handover does not collide. Timings leave each
    contact phase 40-50 steps (0.8-1 s at 50 Hz) to settle.
    """
    pick = _quat_mul(right_start[3:], _axis_angle((0, 1, 0), -60))
    receive = _axis_angle((1, 0, 0), 90)
    cube = np.asarray(cube_xyz, dtype=np.float64)
    wait_left = MEET_XYZ + [-0.1, 0, -0.02]
    hold_left = MEET_XYZ + [0.02, 0, -0.02]
    right = [
        Keyframe(0, right_start[:3], right_start[3:], 0),
        Keyframe(90, cube + [0, 0, 0.08], pick, 1),          # above the cube
        Keyframe(130, cube + [0, 0, -0.015], pick, 1),       # down around it
        Keyframe(170, cube + [0, 0, -0.015], pick, 0),       # close
        Keyframe(200, MEET_XYZ + [0.05, 0, 0], pick, 0),     # lift towards the meeting point
        Keyframe(220, MEET_XYZ, pick, 0),                    # at the meeting point
        Keyframe(310, MEET_XYZ, pick, 1),                    # let go once the left gripper holds it
        Keyframe(360, MEET_XYZ + [0.1, 0, 0], pick, 1),      # withdraw
        Keyframe(EPISODE_STEPS, MEET_XYZ + [0.1, 0, 0], pick, 1),
    ]
    left = [
        Keyframe(0, left_start[:3], left_start[3:], 0),
        Keyframe(100, wait_left, receive, 1),                # wait beside the meeting point, open
        Keyframe(260, hold_left, receive, 1),                # move in around the cube
        Keyframe(310, hold_left, receive, 0),                # close on it
        Keyframe(360, wait_left, _IDENTITY, 0),              # pull it away
        Keyframe(EPISODE_STEPS, wait_left, _IDENTITY, 0),
    ]
    return left, right


def plan_joint_actions(seed: int, mocap: SimEnv | None = None, steps: int = EPISODE_STEPS) -> np.ndarray:
    """The expert's joint-space actions (steps, 14) for reset ``seed``, made in the mocap scene.

    Action ``t`` is the joint position the arms reached after mocap step ``t``, with the gripper
    entries replaced by the commanded (normalised) opening: the fingers stop on the cube before they
    reach the command, and replaying the reached position instead would loosen every grasp.
    """
    env = mocap or make_mocap_env()
    first = env.reset(seed)
    obs = first.observation
    left, right = plan_transfer(obs["env_state"][:3], obs["mocap_pose_left"], obs["mocap_pose_right"])
    actions = np.empty((steps, 14))
    for t in range(steps):
        step = env.step(np.concatenate([interpolate(left, t), interpolate(right, t)]))
        actions[t] = step.observation["qpos"]
        ctrl = step.observation["gripper_ctrl"]
        actions[t, 6] = normalize_puppet_gripper_position(ctrl[0])
        actions[t, 13] = normalize_puppet_gripper_position(ctrl[2])
    return actions


@dataclass
class Rollout:
    """What the joint scene recorded: ``frames[cam][t]`` and ``qpos[t]`` are seen before ``action[t]``."""

    seed: int
    frames: dict[str, np.ndarray]
    qpos: np.ndarray
    qvel: np.ndarray
    action: np.ndarray
    reward: np.ndarray

    @property
    def max_reward(self) -> int:
        return int(self.reward.max()) if len(self.reward) else 0

    @property
    def success(self) -> bool:
        return self.max_reward >= MAX_REWARD


def replay(env: SimEnv, seed: int, actions: np.ndarray) -> Rollout:
    """Send ``actions`` to the joint scene reset with ``seed`` and record everything it shows."""
    step = env.reset(seed)
    cams = list(env.task.cameras)
    frames: dict[str, list[np.ndarray]] = {cam: [] for cam in cams}
    qpos, qvel, reward = [], [], []
    for action in actions:
        for cam in cams:
            frames[cam].append(step.observation["images"][cam])
        qpos.append(step.observation["qpos"])
        qvel.append(step.observation["qvel"])
        step = env.step(action)
        reward.append(step.reward)
    empty = {cam: np.zeros((0, *env.task.cameras[cam], 3), np.uint8) for cam in cams}
    return Rollout(seed=seed, frames={cam: np.stack(f) if f else empty[cam] for cam, f in frames.items()},
                   qpos=np.asarray(qpos, np.float32).reshape(-1, 14),
                   qvel=np.asarray(qvel, np.float32).reshape(-1, 14),
                   action=np.asarray(actions, np.float32), reward=np.asarray(reward, np.float32))


class ScriptedExpert:
    """Makes demonstrations seed by seed, reusing one mocap and one joint scene (building them costs ~0.5 s)."""

    def __init__(self, cameras: Cameras, task: str = "transfer_cube") -> None:
        self.mocap = make_mocap_env(task)
        self.joint = make_joint_env(cameras, task)

    def demonstrate(self, seed: int, steps: int = EPISODE_STEPS) -> Rollout:
        return replay(self.joint, seed, plan_joint_actions(seed, self.mocap, steps))
