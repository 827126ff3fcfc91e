"""Runs one rank's share of a replica on each StepBatch: receive (or embed) the input, run the
stage's layers, then send the hidden states on, or, on the last stage, score and sample. With a
shared LM head the last stage sends some steps' scored rows back to the first stage instead, which
scores and samples them when the driver says so (ScoreStep)."""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from hexcore.model.attention import AttentionMetadata, GatherWorkspace
from hexcore.kernels.select import decode_attention_kernel
from hexcore.model.llama import LlamaStage
from hexcore.executor.messages import StageLayout, StepBatch, StepResult, WorkerStats
from hexcore.model.parallel import TPGroup
from hexcore.model.pipeline import destination_ranks, source_rank
from hexcore.worker.sampler import sample, scored_token


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
        # steps scored on the first stage (a shared LM head): their rows travel back from the last stage
        # (a last-stage rank may have no first-stage rank to send to: it then only skips the scoring)
        self.is_last_of_several = is_last and not is_first
        self.score_destinations = destination_ranks(stage, stages[0], tp.rank) if self.is_last_of_several else []
        self.score_source = source_rank(stages[-1], stage, tp.rank) if is_first and not is_last else None
        self._awaiting_score: dict[int, StepBatch] = {}
        self._pending_sends: tuple[torch.Tensor | None, list] = (None, [])
        self._workspace = GatherWorkspace()
        self._decode_kernel = decode_attention_kernel(device, model.cos.dtype)
        self.busy_seconds = 0.0
        self.num_steps = 0
        self.num_scored_steps = 0  # steps scored for the last stage (a first stage sharing the LM head)
        self.recent_steps: deque[tuple[int, float, float]] = deque(maxlen=256)

    def run(self, batch: StepBatch) -> StepResult | None:
        inputs = self._receive(batch)
        started = time.perf_counter()
        meta = AttentionMetadata.build(batch.query_lens, batch.context_lens, batch.block_tables,
                                       self.block_size, self.device, self.model.cos.dtype, self._workspace,
                                       self._decode_kernel)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        hidden = self.model(inputs, positions, self.kv_caches, meta)  # [T, C]
        result = None
        if not self.is_last:
            self._send(hidden, self.destinations)
            if batch.is_scored_on_first_stage and self.score_source is not None:
                self._awaiting_score[batch.step_id] = batch
        else:
            sample_rows, prompt_rows = batch.scored_rows()
            scored = hidden[sample_rows + prompt_rows] if sample_rows or prompt_rows else None  # [R, C]
            if batch.is_scored_on_first_stage and self.is_last_of_several:
                if scored is not None and self.score_destinations:
                    self._send(scored, self.score_destinations)
            else:
                result = self._score(batch, scored)
        self._record(batch.step_id, started)
        return result

    def score(self, step_id: int) -> StepResult | None:
        """Score and sample a step this (first) stage ran earlier, on the rows the last stage sends back."""
        batch = self._awaiting_score.pop(step_id)
        sample_rows, prompt_rows = batch.scored_rows()
        hidden = None
        if sample_rows or prompt_rows:
            hidden = torch.empty(len(sample_rows) + len(prompt_rows), self.model.dims.hidden_size,
                                 dtype=self.model.cos.dtype, device=self.device)
            dist.recv(hidden, src=self.score_source)
        started = time.perf_counter()
        result = self._score(batch, hidden)
        self.busy_seconds += time.perf_counter() - started
        self.num_scored_steps += 1
        return result

    def stats(self) -> WorkerStats:
        return WorkerStats(self.rank, self.stage_index, self.busy_seconds, self.num_steps, tuple(self.recent_steps),
                           self.num_scored_steps)

    def _record(self, step_id: int, started: float) -> None:
        finished = time.perf_counter()
        self.busy_seconds += finished - started
        self.num_steps += 1
        self.recent_steps.append((step_id, started, finished))

    def _receive(self, batch: StepBatch) -> torch.Tensor:
        if self.source is None:
            return torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
        hidden = torch.empty(batch.num_tokens, self.model.dims.hidden_size, dtype=self.model.cos.dtype,
                             device=self.device)
        dist.recv(hidden, src=self.source)
        return hidden

    def _send(self, hidden: torch.Tensor, destinations: list[int]) -> None:
        """Non-blocking, so this stage moves on to its next micro-batch; the buffer stays referenced
        until the sends are waited for, before the next step's sends."""
        for work in self._pending_sends[1]:
            work.wait()
        self._pending_sends = (hidden, [dist.isend(hidden, dst=rank) for rank in destinations])

    def _score(self, batch: StepBatch, hidden: torch.Tensor | None) -> StepResult | None:
        """hidden: the step's scored rows [R, C] (batch.scored_rows() order), None if there are none."""
        logits = self.model.logits(hidden) if hidden is not None else None  # every TP rank joins the gather
        if logits is not None:
            logits = logits.cpu()  # the sampler draws with CPU generators, the same on every device
        if not self.tp.is_leader:
            return None
        specs = [spec for spec in batch.sampling if spec is not None]
        sampled = iter(sample(logits[: len(specs)], specs)) if specs else iter(())
        tokens = [next(sampled) if spec is not None else None for spec in batch.sampling]
        prompt_logprobs: list = [None] * len(batch.sampling)
        if any(batch.prompt_scoring):
            logprobs = iter(torch.log_softmax(logits[len(specs):], dim=-1))
            for i, scoring in enumerate(batch.prompt_scoring):
                if scoring:
                    prompt_logprobs[i] = [scored_token(next(logprobs), target, scoring.num_top)
                                          for target in scoring.target_ids]
        return StepResult(batch.step_id, tokens, prompt_logprobs)
