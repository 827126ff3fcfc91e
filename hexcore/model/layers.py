"""Tensor-parallel building blocks. Each takes its weight shard and its stage's TPGroup explicitly;
the collectives live here so that the model code reads like a single-device model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hexcore.kernels.select import linear_kernel
from hexcore.model.parallel import TPGroup


class ColumnParallelLinear(nn.Module):
    """y_shard = x @ W_shard^T: input replicated on every rank, output split along features.
    No communication."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.matmul = linear_kernel(weight)  # weight: [out_features / tp, in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_shard @ W_shard^T: input split along features, output all-reduced."""

    def __init__(self, weight: torch.Tensor, tp: TPGroup):
        super().__init__()
        self.matmul = linear_kernel(weight)  # weight: [out_features, in_features / tp]
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.matmul(x))


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [vocab_start, vocab_end) of the table; a token's row comes from the one
    rank that holds it, the others contribute zeros to the all-reduce."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab / tp, hidden]
        self.vocab_start = vocab_start
        self.tp = tp

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        is_mine = (local >= 0) & (local < self.weight.shape[0])
        hidden = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        hidden = hidden * is_mine.unsqueeze(-1).to(hidden.dtype)
        return self.tp.all_reduce(hidden)


class VocabParallelLMHead(nn.Module):
    """Each rank scores its slice of the vocabulary; the stage leader gathers the full logits.
    Shards may be uneven: every rank pads its slice to `shard_size` for the gather."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, shard_size: int, tp: TPGroup):
        super().__init__()
        self.matmul = linear_kernel(weight)  # weight: [<= shard_size, hidden]
        self.vocab_size = vocab_size
        self.shard_size = shard_size
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] on the leader, None elsewhere."""
        logits = self.matmul(hidden).float()
        if self.tp.size == 1:
            return logits
        padding = self.shard_size - logits.shape[-1]
        if padding:
            logits = F.pad(logits, (0, padding), value=float("-inf"))
        parts = self.tp.gather_to_leader(logits)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size] if parts is not None else None
