"""Every device and backend choice in one place: which torch device a worker computes on, which
torch.distributed backend its replica uses, how many threads it may take, how much memory it
may give to the KV cache, and which kernels (packed linear layers, compiled CPU loops) it runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hexcore.config import Device

if TYPE_CHECKING:
    from hexcore.cpu_elementwise import ElementwiseKernels


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
# descheduled (a busy machine, or more workers than cores) then loses little instead of 5x.
WORKER_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


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


# The batch size oneDNN lays a packed weight out for: decode steps of tens of sequences.
PACKED_WEIGHT_BATCH_HINT = 32
# Smaller weights stay plain: a oneDNN call costs ~30 us more than F.linear's, more than a small
# matrix gains from packing (a 64 x 192 weight: 4 us plain, 36 us packed).
PACKED_WEIGHT_MIN_ELEMENTS = 1 << 18


def linear_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., in] -> x @ weight^T [..., out] with the fastest kernel for the weight's device.

    On CPU in float32: hexcore/cpu_linear.py's loop over the weight packed into column panels
    (~1.3x oneDNN at decode batch sizes); where it cannot be built, large weights are packed into
    oneDNN's blocked layout (at decode batch sizes MKL's plain GEMM re-packs the weight on every call,
    which costs it up to half its speed). Elsewhere: F.linear. A packed copy replaces the plain
    weight, except for a tied LM head on the stage that also embeds: the embedding keeps the plain
    table, so such a stage holds vocab x hidden floats twice (113 MB for SmolLM2)."""
    if _has_cpu_loops(weight.device, weight.dtype):
        from hexcore import cpu_linear

        matmul = cpu_linear.packed_linear(weight)
        if matmul is not None:
            return matmul
        if torch.backends.mkldnn.is_available() and weight.numel() >= PACKED_WEIGHT_MIN_ELEMENTS:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_WEIGHT_BATCH_HINT)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def _has_cpu_loops(device: torch.device, dtype: torch.dtype) -> bool:
    """hexcore's compiled C++ loops (hexcore/cpu_extension.py) are written for CPU float32."""
    return device.type == "cpu" and dtype == torch.float32


def decode_attention_kernel(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """A paged decode-attention kernel that reads the KV cache in place, or None for the torch path:
    on CPU in float32, hexcore/cpu_attention.py (compiled on first use)."""
    if _has_cpu_loops(device, dtype):
        from hexcore import cpu_attention

        return cpu_attention.load()
    return None


def elementwise_kernels(device: torch.device, dtype: torch.dtype) -> ElementwiseKernels | None:
    """One-pass RMSNorm and SiLU-and-mul (hexcore/cpu_elementwise.py) on CPU in float32, where they
    build; None elsewhere: the model's torch ops."""
    if _has_cpu_loops(device, dtype):
        from hexcore import cpu_elementwise

        return cpu_elementwise.load()
    return None
