"""Worker processes for the simulator: MuJoCo stepping and software rendering are CPU-bound and hold the GIL.

Workers are never forked from the parent: a fork would copy its threads (torch, pyarrow) in
whatever state they are, and an EGL / OSMesa context is not safe to share with a child. They are
forked from a *fork server* instead: a fresh, single-threaded interpreter started once per command,
which has imported the simulator (dm_control, MuJoCo: about 2 CPU-seconds) and never rendered, so
each worker starts in milliseconds rather than paying that import again. Where there is no fork
server (Windows, macOS spawn-only setups) they are spawned. Either way they render headless with the
parent's ``MUJOCO_GL``, which :mod:`dinocache.sim` sets before anything else is imported.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import dinocache.sim  # noqa: F401  (sets MUJOCO_GL, inherited by the workers through the environment)
from dinocache.cores import available_cores

T = TypeVar("T")

#: The object each worker process builds once (an expert, environments) and then calls per item.
_WORKER_STATE: Any = None


def default_workers(jobs: int) -> int:
    """One worker per available core, never more than there are jobs."""
    return max(1, min(available_cores(), jobs))


def worker_context() -> multiprocessing.context.BaseContext:
    """The fork server, preloaded with the simulator (see the module's docstring), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dinocache.sim.env"])  # takes effect when the server starts (the first worker)
    return context


def _build(factory: Callable[..., Any], args: tuple) -> None:
    global _WORKER_STATE
    _WORKER_STATE = factory(*args)


def _call(method: str, item: Any) -> Any:
    return getattr(_WORKER_STATE, method)(item)


def ordered_map(factory: Callable[..., Any], args: tuple, method: str, items: Iterable[Any], workers: int,
                ahead: int = 2) -> Iterator[Any]:
    """``factory(*args).method(item)`` for every item, in item order, computed by ``workers`` processes.

    Each worker builds its object once. At most ``ahead * workers`` items are in flight, so however
    many items there are, only that many results (an episode's frames each) wait in memory for the
    consumer, which gets them in order as soon as the earliest one is done. ``workers <= 1`` runs in
    this process, with no pool at all.
    """
    if workers <= 1:
        built = factory(*args)
        yield from map(getattr(built, method), items)
        return
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_build,
                             initargs=(factory, args)) as pool:
        try:
            for item in items:
                pending.append(pool.submit(_call, method, item))
                if len(pending) >= ahead * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early or failed: do not compute what nobody will read
            for future in pending:
                future.cancel()
