"""Batches delivered into the training step's device buffers, assembled ahead of the step.

A background thread (:class:`BatchStream`) gathers host batches while the step computes;
:class:`HostBatches` copies them to the device overlapped with the step. Features resident on the
device skip both (:class:`~dinocache.policy.training.data.ResidentBatches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dinocache.datasets.prefetch import Prefetcher

__all__ = ["Batch", "DeviceBatches", "HostBatches", "BatchStream"]

Batch = dict[str, Tensor]


class DeviceBatches:
    """Endless or finite batches written into one set of device buffers (``out``); close when done."""

    def __init__(self, out: Batch) -> None:
        self.out = out

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the batches hold (threads, buffers)."""

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostBatches(DeviceBatches):
    """Batches gathered on the host by a :class:`BatchStream` and copied into ``out`` on the device.

    The host batches live in a ring of ``prefetch + 2`` buffer sets (pinned for a GPU), reused round
    robin: the stream holds at most ``prefetch`` of them, its thread fills one more, and this object
    holds the one being copied, which it waits for before taking the next. So no buffer is
    overwritten while in use, and none is allocated per step. On CUDA the copy of batch ``n + 1`` runs
    on a side stream into a staging buffer while step ``n`` computes; ``__next__`` then only orders a
    device-to-device copy into ``out`` after it. On the CPU the copy is a plain one, the same logic.
    """

    def __init__(self, stream: BatchStream, out: Batch) -> None:
        super().__init__(out)
        self._stream = stream
        device = next(iter(out.values())).device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged: tuple[Batch, Any] | None = None  # (staging buffers, event marking their copy done)
        self._staging = {key: torch.empty_like(value) for key, value in out.items()} if self._side else None
        self._consumed: Any = None  # event: ``out`` has taken the staging buffers' content

    def _stage(self) -> None:
        """Start copying the next host batch to the device (the side stream), or copy it now (CPU)."""
        host = next(self._stream)
        if self._side is None:
            self._staged = (_copy(self.out, host), None)
            return
        with torch.cuda.stream(self._side):
            if self._consumed is not None:  # step n-1's copy out of the staging buffers is done
                self._side.wait_event(self._consumed)
            _copy(self._staging, host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._side)
        self._staged = (self._staging, copied)

    def __next__(self) -> Batch:
        if self._staged is None:
            self._stage()
        staged, copied = self._staged
        self._staged = None
        if copied is not None:
            copied.synchronize()  # the host buffer is free again (the copy was issued a step ago)
            torch.cuda.current_stream().wait_event(copied)
            _copy(self.out, staged, non_blocking=True)
            self._consumed = torch.cuda.Event()
            self._consumed.record()
            try:
                self._stage()  # the next batch's copy overlaps this step
            except StopIteration:
                pass
        return self.out

    def close(self) -> None:
        self._stream.close()


def _copy(out: Batch, batch: Batch, non_blocking: bool = False) -> Batch:
    for key, value in out.items():
        value.copy_(batch[key], non_blocking=non_blocking)
    return out


class BatchStream(Prefetcher[Batch]):
    """Batches produced by a background thread, ``prefetch`` ahead of the consumer (the package's one
    threaded producer, :class:`~dinocache.datasets.prefetch.Prefetcher`).

    The thread only gathers and reads; it draws no random numbers, so running ahead does not change
    any result. An exception in it is re-raised by the next :meth:`__next__`.
    """

    def __init__(self, batches: Iterator[Batch], prefetch: int = 4) -> None:
        super().__init__(lambda: batches, queue_size=prefetch, name="dinocache-batches")

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
