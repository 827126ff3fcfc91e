"""Gloo point-to-point and all-reduce timings between worker processes on this machine, and their
alpha-beta fits.

Forked processes (one thread each) join a gloo group over localhost TCP. Point-to-point: rank 0
and rank 1 ping-pong a message; one transfer is half a round trip. All-reduce: every rank reduces a
tensor of the message size. Calls run back to back in batches and a batch's mean per call is kept
(the median over batches): on a virtual machine single calls are bimodal (a fraction wait for a
scheduler tick), and the mean is what a serving step pays.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hexcore.executor.ports import free_port

_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class AlphaBeta:
    """time(bytes) = latency_s + bytes / bytes_per_second, fitted by least squares on relative error
    (weights 1/time), so the small messages pin the latency and the large ones the bandwidth."""

    latency_s: float
    bytes_per_second: float

    @classmethod
    def fit(cls, sizes: list[int], seconds: list[float]) -> "AlphaBeta":
        times = np.asarray(seconds, float)
        slope, intercept = np.polyfit(np.asarray(sizes, float), times, 1, w=1.0 / times)
        if slope <= 0:
            raise ValueError(f"cannot fit a bandwidth: time does not grow with message size ({seconds})")
        return cls(latency_s=max(0.0, float(intercept)), bytes_per_second=float(1.0 / slope))


@dataclass(frozen=True)
class LinkMeasurement:
    num_workers: int
    sizes: tuple[int, ...]  # message bytes
    p2p_s: tuple[float, ...]  # one-way time per size
    all_reduce_s: tuple[float, ...]  # time per all-reduce per size

    @property
    def p2p(self) -> AlphaBeta:
        return AlphaBeta.fit(list(self.sizes), list(self.p2p_s))

    @property
    def all_reduce(self) -> AlphaBeta:
        return AlphaBeta.fit(list(self.sizes), list(self.all_reduce_s))


def measure_links(num_workers: int, sizes: list[int], num_reps: int) -> LinkMeasurement:
    """Fork `num_workers` gloo processes and time both patterns at each message size."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        port = free_port()
        context = mp.get_context("fork")  # the children need nothing but torch, already imported
        workers = [
            context.Process(target=_worker, args=(rank, num_workers, port, sizes, num_reps, str(out)))
            for rank in range(num_workers)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=_TIMEOUT_S)
        if any(worker.exitcode != 0 for worker in workers):
            for worker in workers:
                worker.kill()
            raise RuntimeError(f"gloo measurement failed: worker exit codes {[w.exitcode for w in workers]}")
        result = json.loads(out.read_text())
    return LinkMeasurement(num_workers, tuple(sizes), tuple(result["p2p"]), tuple(result["all_reduce"]))


def _worker(rank: int, num_workers: int, port: int, sizes: list[int], num_reps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_workers)
    try:
        p2p, all_reduce = [], []
        for size in sizes:
            message = torch.zeros(max(1, size // 4), dtype=torch.float32)
            p2p.append(ping_pong(rank, message, num_reps) / 2)
            all_reduce.append(time_per_call(lambda: dist.all_reduce(message), num_reps))
        if rank == 0:
            Path(out).write_text(json.dumps({"p2p": p2p, "all_reduce": all_reduce}))
    finally:
        dist.destroy_process_group()


def ping_pong(rank: int, message: torch.Tensor, num_reps: int, num_batches: int = 5) -> float:
    """Round-trip time between ranks 0 and 1 (other ranks only join the barriers)."""
    def round_trip() -> None:
        if rank == 0:
            dist.send(message, 1)
            dist.recv(message, 1)
        elif rank == 1:
            dist.recv(message, 0)
            dist.send(message, 0)

    return time_per_call(round_trip, num_reps, num_batches)


def time_per_call(fn, num_reps: int, num_batches: int = 5) -> float:
    """Per-call time: the median over batches of `num_reps` back-to-back calls, each batch started
    together on every rank after one untimed warm-up call."""
    fn()
    per_call = []
    for _ in range(num_batches):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(num_reps):
            fn()
        per_call.append((time.perf_counter() - start) / num_reps)
    return float(np.median(per_call))
