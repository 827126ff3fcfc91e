"""Typed messages between the engine (driver) and its worker processes. Each is pickled whole over a
pipe; the worker dispatches on the message type, never on a string."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hexcore.model.llama import LlamaDims, RopeSpec
from hexcore.outputs import TokenLogprob
from hexcore.sampling_params import SamplingParams


@dataclass(frozen=True)
class StageLayout:
    first_layer: int
    num_layers: int
    ranks: tuple[int, ...]  # world ranks of the stage's devices, by TP rank

    @property
    def tp(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its shard and join its replica."""

    replica: str
    rank: int  # in the replica's torch.distributed world
    device: str  # as written in the deployment file
    stages: tuple[StageLayout, ...]
    model_dir: Path
    dims: LlamaDims
    rope: RopeSpec
    dtype: str
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    num_threads: int
    init_method: str  # torch.distributed rendezvous, e.g. tcp://127.0.0.1:PORT
    backend: str  # gloo | nccl, chosen for the whole replica by hexcore.hardware
    is_lm_head_shared: bool = False  # the first stage also holds the LM head and scores some steps

    @property
    def has_lm_head(self) -> bool:
        index, num_stages = self.stage_index, len(self.stages)
        return index == num_stages - 1 or (self.is_lm_head_shared and index == 0)

    @property
    def world_size(self) -> int:
        return sum(stage.tp for stage in self.stages)

    @property
    def stage_index(self) -> int:
        return next(j for j, stage in enumerate(self.stages) if self.rank in stage.ranks)

    @property
    def label(self) -> str:
        return f"replica {self.replica!r} stage {self.stage_index} rank {self.rank} (device {self.device})"


@dataclass(frozen=True)
class SeqSampling:
    """How the last stage (or the first, for a step it scores) chooses one sequence's next token."""

    params: SamplingParams
    seed: int  # the draw for output token i uses (seed, i): reproducible, stateless, preemption-safe
    num_generated: int
    banned_token_ids: tuple[int, ...] = ()  # e.g. eos and stop ids before min_tokens is reached
    output_token_ids: tuple[int, ...] = ()  # only when penalties need them
    prompt_token_ids: tuple[int, ...] = ()  # only when the repetition penalty needs them


@dataclass(frozen=True)
class PromptScoring:
    """Score prompt tokens: chunk row first_row + i predicts target_ids[i] (the prompt token after it)."""

    first_row: int
    target_ids: list[int]
    num_top: int


@dataclass(frozen=True)
class StepBatch:
    """One forward pass of a replica over a micro-batch: tokens of all its sequences, concatenated."""

    step_id: int
    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    query_lens: list[int]  # per sequence: new tokens this step
    context_lens: list[int]  # per sequence: tokens in the cache after this step
    block_tables: list[list[int]]  # per sequence
    sampling: list[SeqSampling | None]  # per sequence; None when this chunk does not end the known tokens
    prompt_scoring: list[PromptScoring | None]  # per sequence, when prompt logprobs are asked
    # the last stage sends the rows to score back to the first stage, which scores them when told
    # to (ScoreStep); else the last stage scores and samples
    is_scored_on_first_stage: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def scored_rows(self) -> tuple[list[int], list[int]]:
        """Rows of the step's hidden states to score: each sampled sequence's last row, then the
        prompt rows whose next token is scored."""
        sample_rows, prompt_rows, end = [], [], 0
        for n, spec, scoring in zip(self.query_lens, self.sampling, self.prompt_scoring):
            end += n
            if spec is not None:
                sample_rows.append(end - 1)
            if scoring:
                first = end - n + scoring.first_row
                prompt_rows.extend(range(first, first + len(scoring.target_ids)))
        return sample_rows, prompt_rows


@dataclass(frozen=True)
class ScoreStep:
    """To the first stage's ranks: score and sample step `step_id`, whose rows come back from the last stage."""

    step_id: int


@dataclass(frozen=True)
class StepResult:
    step_id: int
    tokens: list[TokenLogprob | None]  # per sequence; None where nothing was sampled
    prompt_logprobs: list[list[TokenLogprob] | None]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class StatsRequest:
    pass


@dataclass(frozen=True)
class WorkerStats:
    rank: int
    stage_index: int
    busy_seconds: float  # time spent computing (not waiting for input), scoring included
    num_steps: int
    recent_steps: tuple[tuple[int, float, float], ...] = ()  # (step id, start, end), shared monotonic clock
    num_scored_steps: int = 0  # steps scored for the last stage (a first stage sharing the LM head)


@dataclass(frozen=True)
class WorkerReady:
    rank: int
    load_seconds: float


@dataclass(frozen=True)
class WorkerFailed:
    label: str
    error: str
    traceback: str = field(default="", repr=False)
