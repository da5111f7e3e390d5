"""Files written whole or not at all: a temporary name beside the target, then a rename.

A reader never sees half a file, and a writer that fails deletes its temporary. One killed outright
(SIGKILL, a lost node) cannot, so temporaries carry the writer's process id and the next writer of
the same target deletes those whose process is gone. Before a large write, :func:`check_room` finds a
read-only folder or a disk without room for it, so that the user gets one line before any work
rather than a writer failing (or aborting the process) half-way.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from dinocache.errors import DinocacheError, os_error_line

__all__ = ["temporary_name", "sweep_temporaries", "process_running", "check_room"]


def temporary_name(out: Path) -> Path:
    """``.NAME.PID.tmp.SUFFIX`` beside ``out`` (the suffix kept: some writers go by it, torch's .pt2 does)."""
    return out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")


def process_running(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(out: Path) -> None:
    """Delete the :func:`temporary_name` files of ``out`` whose writing process is gone."""
    for leftover in out.parent.glob(f".{glob.escape(out.stem)}.*.tmp{glob.escape(out.suffix)}"):
        pid = leftover.name[len(out.stem) + 2:-len(f".tmp{out.suffix}")]
        if pid.isdigit() and not process_running(int(pid)):
            leftover.unlink(missing_ok=True)


def check_room(out: Path, needed: int, option: str = "--out") -> None:
    """Refuse, in one line naming ``option``, a target whose folder cannot be written or whose disk has
    less than ``needed`` bytes free; sweep its abandoned temporaries first."""
    probe = temporary_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(out)
        probe.write_bytes(b"")
        probe.unlink()
        free = shutil.disk_usage(out.parent).free
    except OSError as err:
        raise DinocacheError(f"{option} {out}: cannot write there ({os_error_line(err)}); nothing was written") from None
    if needed > free:
        raise DinocacheError(f"{option} {out}: needs about {needed / 2**20:.0f} MiB and its disk has "
                             f"{free / 2**20:.0f} MiB free; nothing was written")
