"""The collectives a tensor-parallel stage needs, bound to that stage's own process group.

Stages of one replica have different TP degrees, so every layer gets its group explicitly: there is
no global "tp group". A group of size one is the single-device case and does no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int  # this process's rank inside the stage, 0 .. size-1
    size: int
    group: object | None = None  # torch.distributed ProcessGroup; None when size == 1
    global_ranks: tuple[int, ...] = (0,)  # world ranks of the stage's members, by TP rank

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_to_leader(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank contributes a same-shaped tensor; the leader gets all of them in rank order."""
        if self.size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_leader else None
        dist.gather(x.contiguous(), parts, dst=self.global_ranks[0], group=self.group)
        return parts


SINGLE = TPGroup(rank=0, size=1)


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of shard `rank` when `total` items are split into `size` near-equal parts
    (the first `total % size` shards take one extra item)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
