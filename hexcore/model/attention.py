"""Attention over a paged KV cache for a flattened batch of sequences.

A step's tokens from all its sequences are concatenated into one [T, ...] batch. Sequences with a
single new token (decodes) attend together in one padded call; sequences with several new tokens
(prompt chunks) attend one by one with a causal mask offset by the context they already have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class GatherWorkspace:
    """Reusable buffers for the decode path's gathered keys and values: the same memory serves every
    layer of every step, instead of fresh allocations (and page faults) per layer."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = 1
        for dim in shape:
            size *= dim
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[:size].view(shape)


@dataclass(frozen=True)
class PrefillChunk:
    token_start: int  # the chunk's new tokens are batch rows [token_start, token_start + num_new)
    num_new: int
    context_len: int  # tokens in the cache after this step, the new ones included
    block_table: torch.Tensor  # [num_blocks_of_seq]


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]: cache slot of each new token
    is_all_decode: bool  # every sequence has one new token: decode rows are the whole batch, in order
    decode_rows: torch.Tensor  # [Bd]: batch rows of the single-token sequences
    decode_block_tables: torch.Tensor  # [Bd, max_blocks]: their block tables, padded with block 0
    decode_context_lens: torch.Tensor  # [Bd]
    decode_mask: torch.Tensor | None  # torch path only: [Bd, 1, 1, max_blocks * block_size], 0 or -inf
    prefills: tuple[PrefillChunk, ...]
    workspace: GatherWorkspace
    decode_kernel: Callable | None = None  # reads the cache in place (hexcore.kernels.select); None: gather + SDPA

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        workspace: GatherWorkspace | None = None,
        decode_kernel: Callable | None = None,
    ) -> "AttentionMetadata":
        slots, decode_rows, decode_tables, decode_lens, prefills = [], [], [], [], []
        row = 0
        for num_new, context_len, table in zip(query_lens, context_lens, block_tables):
            positions = range(context_len - num_new, context_len)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in positions)
            if num_new == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(context_len)
            else:
                chunk_table = torch.tensor(table, dtype=torch.long, device=device)
                prefills.append(PrefillChunk(row, num_new, context_len, chunk_table))
            row += num_new
        max_blocks = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
        lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
        mask = None
        if decode_kernel is None:
            key_positions = torch.arange(max_blocks * block_size, device=device)
            is_key = (key_positions[None, :] < lens[:, None])[:, None, None, :]
            mask = torch.zeros(is_key.shape, dtype=dtype, device=device).masked_fill_(~is_key, float("-inf"))
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            is_all_decode=not prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_block_tables=torch.tensor(padded, dtype=torch.long, device=device).view(len(padded), max_blocks),
            decode_context_lens=lens,
            decode_mask=mask,
            prefills=tuple(prefills),
            workspace=workspace or GatherWorkspace(),
            decode_kernel=decode_kernel,
        )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D] new keys
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    decoded = _decode_attention(q, k_cache, v_cache, meta, scale) if meta.decode_rows.numel() else None
    if meta.is_all_decode:
        return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[meta.decode_rows] = decoded
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_new)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The single-token sequences together: [Bd, H, D]."""
    num_seqs, (num_kv_heads, head_dim) = meta.decode_rows.numel(), k_cache.shape[2:]
    queries = q if meta.is_all_decode else q[meta.decode_rows]  # [Bd, H, D]
    if meta.decode_kernel is not None:
        return meta.decode_kernel(queries, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    # gather [Bd * max_blocks, block_size, Hkv, D] into reused buffers, seen as [Bd, Hkv, L, D]
    block_ids = meta.decode_block_tables.view(-1)
    gathered_shape = (block_ids.numel(), *k_cache.shape[1:])
    keys = torch.index_select(k_cache, 0, block_ids, out=meta.workspace.take("keys", gathered_shape, k_cache))
    values = torch.index_select(v_cache, 0, block_ids, out=meta.workspace.take("values", gathered_shape, v_cache))
    keys = keys.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = values.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # the query heads sharing a KV head attend as that head's rows: [Bd, Hkv, H / Hkv, D]
    grouped = queries.view(num_seqs, num_kv_heads, -1, head_dim)
    attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return attended.reshape(num_seqs, -1, head_dim)


def _prefill_attention(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """One prompt chunk: q [n, H, D] attends causally to the sequence's cached and new keys."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if chunk.context_len == chunk.num_new:  # nothing cached before: attend to the new tokens only
        keys, values, mask = k, v, None
    else:
        keys = k_cache[chunk.block_table].view(-1, num_kv_heads, head_dim)[: chunk.context_len]
        values = v_cache[chunk.block_table].view(-1, num_kv_heads, head_dim)[: chunk.context_len]
        query_positions = torch.arange(chunk.num_new, device=q.device)[:, None] + chunk.context_len - chunk.num_new
        mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= query_positions
    attended = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
    )
    return attended.squeeze(0).transpose(0, 1)
