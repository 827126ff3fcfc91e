"""Gloo point-to-point between two hosts: one process on each, rank 0 and rank 1 of a world that meets at
a c10d store (the calibrating head's). Gloo binds the interface each host reaches the store through, as
the engine's workers do.

The two ranks ping-pong a message; one transfer is half a round trip, so each figure is the mean of
both directions (the cluster file's links are undirected). Message sizes follow the link: sizes double
from PROBE_BYTES until one transfer takes a quarter of `target_s`, and the largest size timed is the one
the probe's rate carries in `target_s` (a 50 Mbit/s link is not sent the 16 MiB a 10 Gbit/s one needs).
Rank 0 decides and tells rank 1, which follows. Three sizes are timed: SMALL_BYTES for the latency,
and the largest and half of it for the bandwidth (PairTiming.fit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from planning.calibrate.links import AlphaBeta, ping_pong

SMALL_BYTES = 4 << 10  # pins the latency
PROBE_BYTES = 64 << 10
MIN_LARGEST_BYTES = 256 << 10  # well past a shaper's burst at line rate (htb's ~2 ms worth, 32 KiB at least)
MAX_BYTES = 64 << 20
NUM_PROBE_CALLS = 3  # the median of 3 round trips: one stalled by a busy host does not end the probe


@dataclass(frozen=True)
class PairTiming:
    sizes: tuple[int, ...]  # message bytes
    one_way_s: tuple[float, ...]  # half the round trip, per size

    @property
    def fit(self) -> AlphaBeta:
        """Latency: the smallest message's one-way time. Bandwidth: the slope between the two largest
        messages, the rate the link sustains (a shaper or a NIC may let the first few KiB of a message
        through at line rate, which a fit over the small sizes would count as bandwidth)."""
        (mid, large), (mid_s, large_s) = self.sizes[-2:], self.one_way_s[-2:]
        if large_s <= mid_s:
            raise ValueError(f"cannot fit a bandwidth: time does not grow with message size ({self.one_way_s})")
        return AlphaBeta(latency_s=self.one_way_s[0], bytes_per_second=(large - mid) / (large_s - mid_s))


def next_probe(size: int, one_way_s: float, target_s: float) -> tuple[bool, int]:
    """After a probe of `size` bytes took `one_way_s`: (is_done, the next probe size or, when done, the
    largest size to time: what the probe's rate carries in `target_s`, a multiple of 4 KiB)."""
    if one_way_s < target_s / 4 and size * 2 <= MAX_BYTES:
        return False, size * 2
    largest = int(size * target_s / max(one_way_s, 1e-9)) // 4096 * 4096
    return True, min(MAX_BYTES, max(MIN_LARGEST_BYTES, largest))


def time_pair(store_address: str, store_prefix: str, rank: int, target_s: float, num_reps: int, num_batches: int,
              timeout_s: float = 60.0) -> PairTiming | None:
    """Rank `rank` (0 or 1) of the pair; rank 0 returns the timings, rank 1 None."""
    from hexcore.executor.rendezvous import join_store
    from hexcore.hardware import gloo_interface

    store_host = store_address.rsplit(":", 1)[0].strip("[]")
    os.environ["GLOO_SOCKET_IFNAME"] = gloo_interface(store_host)
    torch.set_num_threads(1)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", store=join_store(store_address, store_prefix, timeout), rank=rank, world_size=2,
                            timeout=timeout)
    try:
        largest = _largest_size(rank, target_s)
        sizes = (SMALL_BYTES, largest // 2 // 4096 * 4096, largest)
        one_way = [ping_pong(rank, torch.zeros(size // 4), num_reps, num_batches) / 2 for size in sizes]
    finally:
        dist.destroy_process_group()
    return PairTiming(sizes, tuple(one_way)) if rank == 0 else None


def _largest_size(rank: int, target_s: float) -> int:
    decision = torch.zeros(2, dtype=torch.int64)  # [is_done, size]
    size = PROBE_BYTES
    while True:
        one_way = ping_pong(rank, torch.zeros(size // 4), num_reps=1, num_batches=NUM_PROBE_CALLS) / 2
        if rank == 0:
            is_done, size = next_probe(size, one_way, target_s)
            decision[0], decision[1] = int(is_done), size
        dist.broadcast(decision, src=0)
        if decision[0]:
            return int(decision[1])
        size = int(decision[1])
