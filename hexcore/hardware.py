"""Every device and backend choice in one place: which torch device a worker computes on, which
torch.distributed backend its replica uses, how many threads it may take and how much memory it may
give to the KV cache. Which kernels a device runs is chosen in hexcore/kernels/select.py."""

from __future__ import annotations

import os

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


# OpenMP threads that sleep rather than spin while waiting: a worker whose sibling thread is
# descheduled (a busy machine, or more workers than cores) then loses little instead of most of its
# speed (figures: BENCHMARKS.md, Engine throughput).
WORKER_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def gloo_interface(store_host: str) -> str:
    """The interface gloo binds its sockets to: $GLOO_SOCKET_IFNAME if the user set it, else the one this
    host reaches its replica's store through (loopback for a one-host deployment, so it opens nothing to
    the network; not the address the hostname resolves to, torch's default)."""
    from hexcore.cluster.host import interface_toward

    return os.environ.get("GLOO_SOCKET_IFNAME") or interface_toward(store_host)


def default_num_threads(num_local_workers: int) -> int:
    """The local cores divided among the local workers, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, num_local_workers))


def kv_cache_budget_bytes(device: Device, fraction: float, num_local_cpu_workers: int) -> int:
    """Bytes one worker may spend on its KV cache: a fraction of RAM shared by the CPU workers,
    or a fraction of the GPU's free memory."""
    if device.is_cuda:
        free, _total = torch.cuda.mem_get_info(device.index)
        return int(free * fraction)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * fraction / max(1, num_local_cpu_workers))
