"""Concept-parallel runs: the process group that `torchrun` / `accelerate launch` describe in the environment, and
the few collectives an immunization needs. One process (WORLD_SIZE unset or 1) starts no group: every call here is
then the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mima.utils.device import process_group_backend


@dataclass(frozen=True)
class Shard:
    """This process's share of the concepts: concept n belongs to rank n mod size."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (checkpoints, model, record)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank

    def sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum over processes of each tensor (new tensors; the inputs are left alone), one all-reduce per dtype:
        a message per tensor would cost more than the sums on a model of many small K/V weights."""
        if self.size == 1:
            return tensors
        names, total = sorted(tensors), {}  # the same order on every process
        for dtype in sorted({tensors[n].dtype for n in names}, key=str):
            group = [n for n in names if tensors[n].dtype == dtype]
            flat = torch.cat([tensors[n].detach().reshape(-1) for n in group])
            dist.all_reduce(flat)
            for name, part in zip(group, flat.split([tensors[n].numel() for n in group]), strict=True):
                total[name] = part.view_as(tensors[name])
        return total

    def sum_floats(self, values: list[float]) -> list[float]:
        """The sum over processes of each value (a rank puts 0.0 where another one owns the value)."""
        if self.size == 1:
            return values
        return self.sum({"v": torch.tensor(values, dtype=torch.float64, device=self.device)})["v"].tolist()

    def gather_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Every process's logged values in one dict (each key is logged by one process, or equally by all)."""
        if self.size == 1:
            return logs
        everyone: list[dict[str, float]] = [{} for _ in range(self.size)]
        dist.all_gather_object(everyone, logs)
        return {key: value for rank_logs in everyone for key, value in rank_logs.items()}

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join_process_group(device: torch.device) -> Shard:
    """This process's `Shard`, joining the process group that the launcher's WORLD_SIZE, RANK, MASTER_ADDR and
    MASTER_PORT describe when WORLD_SIZE > 1 (the backend suits `device`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device))
    return Shard(dist.get_rank(), dist.get_world_size(), device)
