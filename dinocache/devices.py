"""Where work runs and how much memory it has there: one answer for every command.

A ``--device`` that this machine does not have (``cuda`` without a GPU, ``cuda:3`` on a two-GPU
machine, a typo) and a batch that cannot fit in memory are refused here, in one line, before any
work: torch would otherwise fail deep inside a model, or the kernel would kill the process for an
allocation of tens of gigabytes without a word. Memory budgets (``--memory-budget``,
``--device-memory-budget``) are parsed here too, as a size or a share of what is available.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import torch

from dinocache.errors import DinocacheError

__all__ = ["resolve_device", "available_memory", "available_device_memory", "free_memory", "check_batch_fits",
           "parse_memory_budget", "DEFAULT_MEMORY_SHARE"]


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """``device`` as a torch device, or the default (CUDA when available, else the CPU); one that is
    not a device name or that this machine does not have is one error naming ``option``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise DinocacheError(f"{option} {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise DinocacheError(f"{option} {device}: CUDA is not available on this machine (use --device cpu)")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise DinocacheError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif target.type not in ("cpu", "mps"):
        raise DinocacheError(f"{option} {device}: dinocache runs on cpu or cuda")
    return target


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``).

    MemAvailable counts reclaimable page cache, unlike MemFree. Outside Linux, falls back to the
    free physical pages as reported by ``sysconf``.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_device_memory(device: torch.device) -> int:
    """Bytes free on a CUDA ``device`` now (``torch.cuda.mem_get_info``); 0 for the CPU, which has no device memory."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can get: free device memory on CUDA, available RAM otherwise."""
    return available_device_memory(device) if device.type == "cuda" else available_memory()


def check_batch_fits(option: str, batch_size: int, bytes_per_sample: int, device: torch.device,
                     what: str) -> None:
    """Refuse ``batch_size`` when ``bytes_per_sample`` (a lower bound of what one sample of a batch
    takes on ``device``: ``what`` says of what) times it exceeds the memory free there now."""
    free = free_memory(device)
    if batch_size * bytes_per_sample > free:
        fits = max(free // max(bytes_per_sample, 1), 0)
        where = f"{device} memory" if device.type == "cuda" else "RAM"
        raise DinocacheError(f"{option} {batch_size}: one batch needs at least {batch_size * bytes_per_sample / 2**30:.1f} "
                             f"GiB ({what}), and {free / 2**30:.1f} GiB of {where} is free; at most {fits} could fit")


#: Share of MemAvailable the features may take by default: leaves room for the optimiser, the
#: prefetched batches, other processes, and the page cache the store is read through.
DEFAULT_MEMORY_SHARE = 0.5

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory_budget(value: str | int | None, processes_per_machine: int = 1,
                        available: Callable[[], int] = available_memory, option: str = "--memory-budget") -> int:
    """Bytes the cached features may occupy in this process's RAM (or, with ``available``, device memory).

    ``value`` is bytes, a size (``"24GiB"``, ``"24G"``, ``"500MB"``), a share of the currently
    available memory (``"50%"``, of what ``available()`` returns), or None for
    :data:`DEFAULT_MEMORY_SHARE` of it. Shares are divided by ``processes_per_machine``: every DDP
    rank on a machine holds its own copy (for device memory that is 1: one device per rank).
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = "" if value is None else str(value).strip().lower().replace(" ", "")
    if text in ("", "auto"):
        text = f"{DEFAULT_MEMORY_SHARE * 100:g}%"
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise DinocacheError(f"{option} {value!r}: a share must be between 0% and 100%")
        return int(available() * share / max(processes_per_machine, 1))
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if not match or match.group(2) not in _UNITS:
        raise DinocacheError(f"{option} {value!r}: expected a size like 24GiB or 500MB, or a share like 50%")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
