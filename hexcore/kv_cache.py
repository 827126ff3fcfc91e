"""The paged KV cache of one rank: its own layers and KV heads, in fixed-size blocks.
Block ids are the same on every rank of a replica; the driver's block manager hands them out."""

from __future__ import annotations

import torch

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> int:
    """Keys and values of `block_size` tokens for this rank's layers and KV heads."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * _BYTES[dtype]


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
