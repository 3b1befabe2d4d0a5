"""Running under `torchrun`: DistributedDataParallel with NCCL on GPUs and gloo on CPUs.

torch.distributed does the distribution itself; this module only reads torchrun's environment, wraps
the network, gives each rank its own share of the data and lets ranks agree on when to stop. Without
torchrun (WORLD_SIZE unset or 1) every method is a no-op and training runs in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, TypeVar

import torch

Item = TypeVar("Item")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha1, repr=False)
    batches_seen: int = 0
    cases_seen: List[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, chosen: torch.device) -> torch.device:
        """One GPU per process under torchrun."""
        if self.distributed and chosen.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return chosen

    def wrap(self, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.distributed:
            return network
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, cases: Sequence[Item]) -> List[Item]:
        """This rank's cases: a disjoint share when there are enough, else all of them (with another seed)."""
        if not self.distributed or len(cases) < self.size:
            return list(cases)
        return list(cases[self.rank :: self.size])

    def seed(self, base: int) -> int:
        return base + 7919 * self.rank  # each rank its own random crops and augmentations

    def agree_to_stop(self, stop: bool) -> bool:
        """True on every rank if any rank wants to stop (a time budget read on different clocks)."""
        if not self.distributed:
            return stop
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def record(self, case_name: str, images: torch.Tensor) -> None:
        """What this rank trained on (written to ``distributed/rank<N>.json``), to show the shares differ."""
        if self.distributed:
            self.batches_seen += 1
            self.digest.update(images.detach().cpu().numpy().tobytes())
            if case_name not in self.cases_seen:
                self.cases_seen.append(case_name)

    def write_record(self, folder: Path) -> None:
        if not self.distributed:
            return
        target = Path(folder) / "distributed"
        target.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": self.rank,
            "world_size": self.size,
            "batches": self.batches_seen,
            "cases": self.cases_seen,
            "data_sha1": self.digest.hexdigest(),
        }
        (target / f"rank{self.rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_world(device_kind: str) -> World:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    backend = "nccl" if device_kind == "cuda" and torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return World(rank=torch.distributed.get_rank(), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
