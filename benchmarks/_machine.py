"""What every benchmark records about the machine it ran on, so a figure in docs/benchmarks.md can be
traced to its hardware and software. Imported by the scripts beside it (``python benchmarks/x.py``
puts this folder on ``sys.path``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: str, threads: int | None = None) -> dict[str, Any]:
    """CPU, core count, Python / torch / timm versions, torch threads, and the GPU's name on CUDA."""
    import timm
    import torch

    info: dict[str, Any] = {"device": device, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                            "torch_threads": threads or torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
