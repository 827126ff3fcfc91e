"""The paged KV cache of one rank: its own layers and KV heads, in fixed-size blocks.
Block ids are the same on every rank of a replica; the driver's block manager hands them out."""

from __future__ import annotations

import math

import numpy as np
import torch

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> int:
    """Keys and values of `block_size` tokens for this rank's layers and KV heads."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * _BYTES[dtype]


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim], all zeros.

    On CPU the memory comes from calloc: a large cache is mapped zero pages that cost RAM only once
    written, so a generous budget does not commit gigabytes at start-up."""
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)
