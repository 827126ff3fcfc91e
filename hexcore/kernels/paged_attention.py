"""Decode attention over the paged KV cache on CPU without copying the cache, compiled on first use.

The torch path (hexcore/model/attention.py) copies every decoding sequence's keys and values out of their
blocks into one padded batch before SDPA reads them again. Here one C++ loop per sequence reads each
cached token's row (all its KV heads, contiguous in the block) once, in place, block by block:

    scores [H, block] = q . k * scale          (the block's keys; query head h reads KV head h // (H / Hkv))
    running softmax: max and sum per head, earlier sums rescaled when the max grows
    acc [H, D] += exp(scores - max) . v        (the block's values), out = acc / sum

while the next block is prefetched (blocks lie anywhere in the cache). The loop runs on torch's own
thread pool (at::parallel_for over sequences), so a worker's thread budget holds. The C++ is
csrc/paged_attention.cpp, compiled on first use (hexcore/kernels/build.py); `load()` returns None
where it cannot be built.
"""

from __future__ import annotations

import torch

from hexcore.kernels.build import CppExtension

_EXTENSION = CppExtension("hexgen_paged_decode_attention", "paged_attention.cpp", ["paged_decode_attention"],
                          "CPU decode-attention kernel")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] float32 over the cache's blocks (block_tables [B, max_blocks], context_lens [B])
    -> [B, H, D]."""
    return _EXTENSION.module().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def load():
    """`paged_decode_attention`, once its loop is built (on the first call in any process of this
    machine; later calls and processes reuse the build), or None where they cannot be built."""
    return paged_decode_attention if _EXTENSION.module() is not None else None
