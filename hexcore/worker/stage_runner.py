"""Runs one rank's share of a replica on each StepBatch: receive (or embed) the input, run the
stage's layers, then send the hidden states on, or, on the last stage, score and sample."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from hexcore.executor.messages import StepBatch, StepResult, WorkerStats
from hexcore.executor.specs import PipelineStage
from hexcore.kernels.select import decode_attention_kernel
from hexcore.model.attention import AttentionMetadata, GatherWorkspace
from hexcore.model.kv_cache import allocate_kv_cache, bytes_per_block
from hexcore.model.llama import LlamaStage, load_stage, read_model_config
from hexcore.model.parallel import SINGLE, TPGroup
from hexcore.model.pipeline import destination_ranks, source_rank
from hexcore.model.weights import Checkpoint
from hexcore.worker.grammar import DEFERRED, GrammarMatchers
from hexcore.worker.sampler import sample, scored_token


class StageRunner:
    def __init__(self, model: LlamaStage, kv_caches: torch.Tensor | None, tp: TPGroup, rank: int, stage_index: int,
                 stages: tuple[PipelineStage, ...], block_size: int, device: torch.device):
        self.model, self.kv_caches, self.tp = model, kv_caches, tp
        self.rank, self.stage_index, self.block_size, self.device = rank, stage_index, block_size, device
        stage = stages[stage_index]
        is_first, self.is_last = stage_index == 0, stage_index == len(stages) - 1
        self.source = None if is_first else source_rank(stages[stage_index - 1], stage, tp.rank)
        self.destinations = [] if self.is_last else destination_ranks(stage, stages[stage_index + 1], tp.rank)
        self._pending_sends: tuple[torch.Tensor | None, list] = (None, [])
        self._workspace = GatherWorkspace()
        self.decode_kernel = decode_attention_kernel(device, model.cos.dtype)
        self.busy_seconds = 0.0
        self.num_steps = 0
        self.recent_steps: deque[tuple[int, float, float]] = deque(maxlen=256)
        self.model_dir: Path | None = None  # where the tokenizer is, for grammars
        self._grammars: GrammarMatchers | None = None

    def start_grammars(self) -> GrammarMatchers:
        """The grammar masks of constrained requests (structured outputs); on the rank that samples, the
        worker starts them at once so the tokenizer loads in the background."""
        if self._grammars is None:
            if self.model_dir is None:
                raise RuntimeError("this stage runner has no model directory to build grammars from")
            self._grammars = GrammarMatchers(self.model_dir, self.model.dims.vocab_size)
        return self._grammars

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])

    @property
    def kv_block_bytes(self) -> int:
        dims, dtype = self.model.dims, str(self.model.cos.dtype).removeprefix("torch.")
        return bytes_per_block(len(self.model.layers), dims.num_kv_heads // self.tp.size, dims.head_dim,
                               self.block_size, dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Start-up, phase two (after the weights are loaded and the replica's block count is known)."""
        dims = self.model.dims
        self.kv_caches = allocate_kv_cache(len(self.model.layers), num_blocks, self.block_size,
                                           dims.num_kv_heads // self.tp.size, dims.head_dim, self.model.cos.dtype,
                                           self.device)

    def run(self, batch: StepBatch) -> StepResult | None:
        inputs = self._receive(batch)
        started = time.perf_counter()
        meta = AttentionMetadata.build(batch.query_lens, batch.context_lens, batch.block_tables,
                                       self.block_size, self.device, self.model.cos.dtype, self._workspace,
                                       self.decode_kernel)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        hidden = self.model(inputs, positions, self.kv_caches, meta)  # [T, C]
        result = None
        if not self.is_last:
            self._send(hidden, self.destinations)
        else:
            sample_rows, prompt_rows = batch.scored_rows()
            scored = hidden[sample_rows + prompt_rows] if sample_rows or prompt_rows else None  # [R, C]
            result = self._score(batch, scored)
        self._record(batch.step_id, started)
        return result

    def stats(self) -> WorkerStats:
        return WorkerStats(self.rank, self.stage_index, self.busy_seconds, self.num_steps, tuple(self.recent_steps))

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
        allowed = None
        if any(spec.params.grammar is not None for spec in specs):
            allowed = self.start_grammars().allowed(specs)
        masks = [None if mask is DEFERRED else mask for mask in allowed] if allowed is not None else None
        sampled = iter(sample(logits[: len(specs)], specs, masks)) if specs else iter(())
        # a row whose grammar is still compiling gets no token: the engine computes its last token again
        tokens = [next(sampled) if spec is not None else None for spec in batch.sampling]
        if allowed is not None:
            deferred = iter(mask is DEFERRED for mask in allowed)
            tokens = [None if spec is not None and next(deferred) else token
                      for spec, token in zip(batch.sampling, tokens)]
        prompt_logprobs: list = [None] * len(batch.sampling)
        if any(batch.prompt_scoring):
            logprobs = iter(torch.log_softmax(logits[len(specs):], dim=-1))
            for i, scoring in enumerate(batch.prompt_scoring):
                if scoring:
                    prompt_logprobs[i] = [scored_token(next(logprobs), target, scoring.num_top)
                                          for target in scoring.target_ids]
        return StepResult(batch.step_id, tokens, prompt_logprobs)


def load_stage_runner(model_dir: Path, dtype: str, device: torch.device, stages: tuple[PipelineStage, ...],
                      stage_index: int, tp: TPGroup, rank: int, num_kv_blocks: int | None, block_size: int,
                      max_model_len: int, num_model_layers: int | None = None) -> StageRunner:
    """Load one rank's shard of its stage, and allocate its KV cache unless `num_kv_blocks` is None (a
    worker's two-phase start allocates it later). `num_model_layers` cuts the model after that many
    layers (the last stage then holds the head), for measurements of smaller models."""
    dims, rope = read_model_config(model_dir)
    if num_model_layers is not None:
        dims = dataclasses.replace(dims, num_layers=num_model_layers)
    stage = stages[stage_index]
    checkpoint = Checkpoint(model_dir, getattr(torch, dtype), device)
    model = load_stage(checkpoint, dims, rope, stage.first_layer, stage.num_layers, tp, max_model_len)
    checkpoint.close()
    runner = StageRunner(model, None, tp, rank, stage_index, stages, block_size, device)
    runner.model_dir = Path(model_dir)
    if num_kv_blocks is not None:
        runner.allocate_kv_cache(num_kv_blocks)
    return runner


def single_rank_runner(model_dir: Path, num_layers: int, dtype: str, num_kv_blocks: int, block_size: int,
                       max_model_len: int) -> StageRunner:
    """The model's first `num_layers` layers, embedding and head as one CPU stage in this process: what a
    one-stage TP 1 worker runs, for calibration and profiling (no torch.distributed world)."""
    stages = (PipelineStage(0, num_layers, (0,)),)
    return load_stage_runner(model_dir, dtype, torch.device("cpu"), stages, 0, SINGLE, 0, num_kv_blocks,
                             block_size, max_model_len, num_model_layers=num_layers)
