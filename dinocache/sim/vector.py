"""Many joint-scene environments stepped together: the vectorised simulator behind ``sim eval --num-envs``.

An :class:`EnvPool` holds ``num_envs`` environments, numbered 0 .. num_envs - 1 (their *slots*),
spread over ``workers`` worker processes (slot ``i`` lives in worker ``i % workers``; ``workers=0``
keeps them all in this process). Every call names the slots it concerns, so the caller resets one
environment while the others keep going, and stops stepping those that are done. A command goes to
every worker holding one of its slots and returns a ticket at once (:meth:`EnvPool.submit`);
:meth:`EnvPool.result` waits for the answers. In between the parent is free: ``sim eval`` queries
the policy for one half of the environments while the other half steps. Camera frames do not travel
through the pipes: each
slot has one shared-memory buffer per camera, which its worker renders into and the parent copies
out of (pickling a 240x320 frame through a pipe cost 1.3 ms per step, a sixth of the step itself).

An environment's episode depends only on its reset seed and the actions it is sent, whichever slot
or process it runs in: MuJoCo and the software renderer are deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import RawArray
from typing import Any

import numpy as np

from dinocache.sim.env import Cameras, make_joint_env
from dinocache.sim.parallel import worker_context


@dataclass
class Transition:
    """What one environment shows after a reset or a step: its camera frames, joint positions, reward."""

    images: dict[str, np.ndarray]
    qpos: np.ndarray
    reward: float


class EnvGroup:
    """The environments of some slots, in one process."""

    def __init__(self, cameras: Cameras, task: str, slots: Iterable[int]) -> None:
        self.envs = {slot: make_joint_env(cameras, task) for slot in slots}

    def reset(self, seeds: Mapping[int, int]) -> dict[int, Transition]:
        return {slot: _transition(self.envs[slot].reset(seed)) for slot, seed in seeds.items()}

    def step(self, actions: Mapping[int, np.ndarray]) -> dict[int, Transition]:
        return {slot: _transition(self.envs[slot].step(action)) for slot, action in actions.items()}


def _transition(step: Any) -> Transition:
    return Transition(images=step.observation["images"], qpos=step.observation["qpos"],
                      reward=float(step.reward or 0.0))  # dm_control's first TimeStep has no reward


FrameBuffers = dict[int, dict[str, np.ndarray]]  # slot -> camera -> (height, width, 3) uint8 in shared memory


def _frame_views(cameras: Cameras, buffers: Mapping[int, Mapping[str, Any]]) -> FrameBuffers:
    """Numpy views of each slot's shared frame buffers (``RawArray`` of bytes, one per camera)."""
    return {slot: {cam: np.frombuffer(raw, dtype=np.uint8).reshape(*cameras[cam], 3) for cam, raw in by_cam.items()}
            for slot, by_cam in buffers.items()}


def _serve(conn: Connection, cameras: Cameras, task: str, buffers: dict[int, dict[str, Any]]) -> None:
    """A worker: build the environments of its slots, then answer ``(command, by_slot)`` until told to close.

    Frames go into the slots' shared buffers; the transitions sent back carry none. Any exception
    goes back to the parent as the answer (it re-raises it), so a bad camera name or a crash in
    MuJoCo is one error there, not a hung pipe.
    """
    try:
        group = EnvGroup(cameras, task, buffers)
        frames = _frame_views(cameras, buffers)
        conn.send(None)
        while (message := conn.recv()) is not None:
            command, by_slot = message
            shown = getattr(group, command)(by_slot)
            for slot, transition in shown.items():
                for cam, image in transition.images.items():
                    np.copyto(frames[slot][cam], image)
                transition.images = {}
            conn.send(shown)
    except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(err)
    finally:
        conn.close()


class EnvPool:
    """``num_envs`` joint-scene environments in ``workers`` processes (0: in this one); use as a context manager."""

    def __init__(self, cameras: Cameras, task: str, num_envs: int, workers: int) -> None:
        if num_envs < 1 or workers < 0:
            raise ValueError(f"an environment pool needs num_envs >= 1 and workers >= 0, got {num_envs}, {workers}")
        self.num_envs, self.workers = num_envs, min(workers, num_envs)
        self._local = EnvGroup(cameras, task, range(num_envs)) if self.workers == 0 else None
        self._conns: list[Connection] = []
        self._procs = []
        self._tickets = 0
        self._queued: list[deque[int]] = [deque() for _ in range(self.workers)]  # per worker: tickets it owes, in order
        self._owed: dict[int, set[int]] = {}  # ticket -> workers whose answer is still unread
        self._done: dict[int, dict[int, Transition]] = {}  # ticket -> transitions read so far
        self._busy: set[int] = set()  # slots with a command in flight
        context = worker_context()
        buffers = {slot: {cam: RawArray("B", height * width * 3) for cam, (height, width) in cameras.items()}
                   for slot in range(num_envs if self.workers else 0)}
        self._frames = _frame_views(cameras, buffers)
        for worker in range(self.workers):
            parent, child = context.Pipe()
            mine = {slot: buffers[slot] for slot in range(worker, num_envs, self.workers)}
            proc = context.Process(target=_serve, args=(child, dict(cameras), task, mine),
                                   daemon=True, name=f"dinocache-sim-{worker}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            for conn in self._conns:  # every worker has built its environments, or this raises why not
                self._answer(conn)
        except BaseException:
            self.close()
            raise

    def reset(self, seeds: Mapping[int, int]) -> dict[int, Transition]:
        """Reset the environments of the given slots with their seeds (``{slot: seed}``)."""
        return self.result(self.submit("reset", seeds))

    def step(self, actions: Mapping[int, np.ndarray]) -> dict[int, Transition]:
        """Step the environments of the given slots (``{slot: action}``); the others stay where they are."""
        return self.result(self.submit_step(actions))

    def submit_step(self, actions: Mapping[int, np.ndarray]) -> int:
        """Start stepping the given slots and return at once: a ticket for :meth:`result`."""
        return self.submit("step", {slot: np.asarray(action, dtype=np.float64) for slot, action in actions.items()})

    def submit(self, command: str, by_slot: Mapping[int, Any]) -> int:
        """Send ``command`` (``reset`` or ``step``) for the given slots without waiting; return its ticket.

        A slot takes a new command only once the result of its previous one has been taken, so its
        frame buffers hold what that result shows until then. Without workers the command runs here.
        """
        busy = sorted(set(by_slot) & self._busy)
        if busy:
            raise RuntimeError(f"slots {busy} still have a command in flight; take its result first")
        ticket, self._tickets = self._tickets, self._tickets + 1
        self._owed[ticket], self._done[ticket] = set(), {}
        if self._local is not None:
            self._done[ticket] = getattr(self._local, command)(by_slot)
            return ticket
        shares: dict[int, dict[int, Any]] = {}
        for slot, value in by_slot.items():
            shares.setdefault(slot % self.workers, {})[slot] = value
        for worker, share in shares.items():
            self._conns[worker].send((command, share))
            self._queued[worker].append(ticket)
            self._owed[ticket].add(worker)
        self._busy.update(by_slot)
        return ticket

    def result(self, ticket: int) -> dict[int, Transition]:
        """Wait for a submitted command's transitions, by slot.

        Each worker answers in the order it was asked, so answers to commands submitted before this
        one are read on the way and kept for their own :meth:`result`.
        """
        owed = self._owed[ticket]
        while owed:
            worker = next(iter(owed))
            earliest = self._queued[worker].popleft()
            answer = self._answer(self._conns[worker])
            for slot, transition in answer.items():  # copied: the slot's next command renders over the buffers
                transition.images = {cam: frame.copy() for cam, frame in self._frames[slot].items()}
            self._busy.difference_update(answer)
            self._done[earliest].update(answer)
            self._owed[earliest].discard(worker)
        del self._owed[ticket]
        return self._done.pop(ticket)

    @staticmethod
    def _answer(conn: Connection) -> Any:
        try:
            answer = conn.recv()
        except EOFError:
            raise RuntimeError("a simulator worker process died (see its output above)") from None
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass  # already gone
            conn.close()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
