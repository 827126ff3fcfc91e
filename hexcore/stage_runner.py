"""Runs one rank's share of a replica on each StepBatch: receive (or embed) the input, run the
stage's layers, then send the hidden states on, or, on the last stage, score and sample."""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from hexcore.attention import AttentionMetadata, GatherWorkspace
from hexcore.devices import decode_attention_kernel
from hexcore.llama import LlamaStage
from hexcore.messages import StageLayout, StepBatch, StepResult, WorkerStats
from hexcore.parallel import TPGroup
from hexcore.pipeline import destination_ranks, source_rank
from hexcore.sampler import sample, scored_token


class StageRunner:
    def __init__(self, model: LlamaStage, kv_caches: torch.Tensor, tp: TPGroup, rank: int, stage_index: int,
                 stages: tuple[StageLayout, ...], block_size: int, device: torch.device):
        self.model, self.kv_caches, self.tp = model, kv_caches, tp
        self.rank, self.stage_index, self.block_size, self.device = rank, stage_index, block_size, device
        stage = stages[stage_index]
        is_first, is_last = stage_index == 0, stage_index == len(stages) - 1
        self.source = None if is_first else source_rank(stages[stage_index - 1], stage, tp.rank)
        self.is_last = is_last
        self.destinations = [] if is_last else destination_ranks(stage, stages[stage_index + 1], tp.rank)
        self._pending_sends: tuple[torch.Tensor | None, list] = (None, [])
        self._workspace = GatherWorkspace()
        self._decode_kernel = decode_attention_kernel(device, model.cos.dtype)
        self.busy_seconds = 0.0
        self.num_steps = 0
        self.recent_steps: deque[tuple[int, float, float]] = deque(maxlen=256)

    def run(self, batch: StepBatch) -> StepResult | None:
        inputs = self._receive(batch)
        started = time.perf_counter()
        meta = AttentionMetadata.build(batch.query_lens, batch.context_lens, batch.block_tables,
                                       self.block_size, self.device, self.model.cos.dtype, self._workspace,
                                       self._decode_kernel)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        hidden = self.model(inputs, positions, self.kv_caches, meta)  # [T, C]
        result = self._sample(batch, hidden) if self.is_last else self._send(hidden)
        finished = time.perf_counter()
        self.busy_seconds += finished - started
        self.num_steps += 1
        self.recent_steps.append((batch.step_id, started, finished))
        return result

    def stats(self) -> WorkerStats:
        return WorkerStats(self.rank, self.stage_index, self.busy_seconds, self.num_steps, tuple(self.recent_steps))

    def _receive(self, batch: StepBatch) -> torch.Tensor:
        if self.source is None:
            return torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
        hidden = torch.empty(batch.num_tokens, self.model.dims.hidden_size, dtype=self.model.cos.dtype,
                             device=self.device)
        dist.recv(hidden, src=self.source)
        return hidden

    def _send(self, hidden: torch.Tensor) -> None:
        """Non-blocking, so this stage moves on to its next micro-batch; the buffer stays referenced
        until the sends are waited for, before the next step's sends."""
        for work in self._pending_sends[1]:
            work.wait()
        self._pending_sends = (hidden, [dist.isend(hidden, dst=rank) for rank in self.destinations])

    def _sample(self, batch: StepBatch, hidden: torch.Tensor) -> StepResult | None:
        ends = torch.tensor(batch.query_lens).cumsum(0).tolist()
        sample_rows = [end - 1 for end, spec in zip(ends, batch.sampling) if spec is not None]
        prompt_rows = [row for end, n, scoring in zip(ends, batch.query_lens, batch.prompt_scoring) if scoring
                       for row in range(end - n + scoring.first_row, end - n + scoring.first_row + len(scoring.target_ids))]
        rows = sample_rows + prompt_rows
        logits = self.model.logits(hidden[rows]) if rows else None  # every TP rank joins the gather
        if logits is not None:
            logits = logits.cpu()  # the sampler draws with CPU generators, the same on every device
        if not self.tp.is_leader:
            return None
        specs = [spec for spec in batch.sampling if spec is not None]
        sampled = iter(sample(logits[: len(specs)], specs)) if specs else iter(())
        tokens = [next(sampled) if spec is not None else None for spec in batch.sampling]
        prompt_logprobs: list = [None] * len(batch.sampling)
        if prompt_rows:
            logprobs = iter(torch.log_softmax(logits[len(specs):], dim=-1))
            for i, scoring in enumerate(batch.prompt_scoring):
                if scoring:
                    prompt_logprobs[i] = [scored_token(next(logprobs), target, scoring.num_top)
                                          for target in scoring.target_ids]
        return StepResult(batch.step_id, tokens, prompt_logprobs)
