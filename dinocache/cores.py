"""How many CPU cores this process may use: one answer for the decoders, the encoders and the simulator's workers."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on: the affinity mask (which containers, SLURM and ``taskset``
    narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
