"""Every device and backend choice in one place: which torch device a worker computes on, which
torch.distributed backend its replica uses, how many threads it may take and how much memory it may
give to the KV cache. Which kernels a device runs is chosen in hexcore/kernels/select.py.

How a worker's OpenMP threads wait is left to libgomp's default: after a parallel region they spin a few
ms (GOMP_SPINCOUNT 300k) before sleeping, so the ~150 parallel regions of a decode step do not each pay a
thread wake-up. Against sleeping at once (OMP_WAIT_POLICY=PASSIVE): batch-1 decode 1.3-1.6x faster, 32
concurrent requests 1.14-1.30x (BENCHMARKS.md, "Against vLLM and llama.cpp"). On a host whose cores are
busy with other work, spinning threads take turns from their own team (a step 6x slower with two busy
processes on two cores): there, start the server or node agent with OMP_WAIT_POLICY=PASSIVE; workers
inherit its environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hexcore.config import Device


def distributed_backend(devices: list[Device]) -> str:
    """NCCL when every device of the replica is a GPU, gloo otherwise (CPU, or mixed)."""
    return "nccl" if all(d.is_cuda for d in devices) else "gloo"


def check_available(device: Device) -> None:
    if device.is_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available on this machine")
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} requested but this machine has {torch.cuda.device_count()} GPUs"
            )


def torch_device(device: Device) -> torch.device:
    return torch.device(device.torch_name)


def gloo_interface(store_host: str) -> str:
    """The interface gloo binds its sockets to: $GLOO_SOCKET_IFNAME if the user set it, else the one this
    host reaches its replica's store through (loopback for a one-host deployment, so it opens nothing to
    the network; not the address the hostname resolves to, torch's default)."""
    from hexcore.cluster.host import interface_toward

    return os.environ.get("GLOO_SOCKET_IFNAME") or interface_toward(store_host)


@dataclass(frozen=True)
class HostBudget:
    """What one host gives hexgen's workers, shared by the workers it runs: all its cores and RAM unless
    told less (`hexgen node --num-cpus --memory-gb`, or the deployment's `cluster:` for the head), the way
    `ray start --num-cpus --memory` declares a node's resources."""

    num_cpus: int
    memory_bytes: int

    @classmethod
    def of_this_host(cls, num_cpus: int | None = None, memory_gb: float | None = None) -> "HostBudget":
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError(f"memory_gb must be positive, got {memory_gb}")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(num_cpus or os.cpu_count() or 1, int(memory_gb * 1e9) if memory_gb is not None else ram)

    def num_threads(self, num_local_workers: int) -> int:
        """Its cores divided among the workers it runs, at least one each."""
        return max(1, self.num_cpus // max(1, num_local_workers))

    def memory_share(self, num_local_workers: int) -> int:
        return self.memory_bytes // max(1, num_local_workers)


def kv_cache_budget_bytes(device: Device, fraction: float, budget: HostBudget, num_local_workers: int,
                          weights_bytes: int) -> int:
    """Bytes a worker that has loaded its weights may give its KV cache: on a GPU a fraction of the free
    memory it now measures; on a CPU a fraction of its share of the host's memory budget, but never more
    than that share leaves beside its weights."""
    if device.is_cuda:
        free, _total = torch.cuda.mem_get_info(device.index)
        return int(free * fraction)
    share = budget.memory_share(num_local_workers)
    if weights_bytes >= share:
        raise ValueError(f"{device}'s share of this host's memory budget is {share / 1e9:.3f} GB "
                         f"({budget.memory_bytes / 1e9:.3f} GB over {num_local_workers} worker(s)), but its "
                         f"weights alone take {weights_bytes / 1e9:.3f} GB")
    return min(int(share * fraction), share - weights_bytes)
