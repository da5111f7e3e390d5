"""Closed-loop simulation: scripted ALOHA transfer-cube demonstrations and evaluation of exported policies.

Needs the optional extra ``pip install 'dinocache[sim]'`` (gym-aloha, MuJoCo, dm_control). Rendering is
headless: ``MUJOCO_GL`` defaults to ``egl`` here, before anything imports MuJoCo's GL bindings, because
the other backends need a display (glfw) or a library most machines lack (osmesa). Set ``MUJOCO_GL``
yourself to override. The user guide is ``docs/sim.md``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

#: The one line every entry point prints when the extra is missing.
INSTALL_HINT = "the simulator is an optional extra: pip install 'dinocache[sim]'"
#: ... and where the extra cannot be installed: dm-control needs labmaze, which publishes wheels up to
#: Python 3.12 only and otherwise builds from source with Bazel. The extra installs nothing there.
PYTHON_HINT = ("the simulator needs Python 3.11 or 3.12: dm-control needs labmaze, which has no wheel for "
               "Python {version} (its source build needs Bazel)")


def require_sim() -> None:
    """Raise a one-line :class:`~dinocache.errors.DinocacheError` when the ``sim`` extra is missing."""
    from importlib.util import find_spec

    from dinocache.errors import DinocacheError

    missing = [name for name in ("gym_aloha", "dm_control", "mujoco") if find_spec(name) is None]
    if missing and sys.version_info >= (3, 13):
        raise DinocacheError(PYTHON_HINT.format(version=f"{sys.version_info[0]}.{sys.version_info[1]}"))
    if missing:
        raise DinocacheError(f"{INSTALL_HINT} ({', '.join(missing)} not installed)")
