"""This process's place among the ``torchrun`` workers: rank, world size, device, and the few collectives training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from dinocache.devices import resolve_device

__all__ = ["Processes"]


@dataclass
class Processes:
    """This process's place among the ``torchrun`` workers (one process alone without torchrun)."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @classmethod
    def setup(cls, device: str | None) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        target = resolve_device(device)
        if world_size > 1:
            if target.type == "cuda":
                target = torch.device("cuda", local_rank)
                torch.cuda.set_device(target)
            torch_dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        return cls(rank, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), target)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(objects, obj)
        return objects

    def teardown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()
