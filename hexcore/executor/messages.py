"""Typed messages between the engine (driver) and its worker processes, per step and for control.
Each is pickled whole over a pipe; the worker dispatches on the message type, never on a string.
Nothing here is specific to a model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from hexcore.outputs import TokenLogprob
from hexcore.sampling_params import SamplingParams


@dataclass(frozen=True)
class SeqSampling:
    """How the last stage chooses one sequence's next token."""

    params: SamplingParams
    seed: int  # the draw for output token i uses (seed, i): reproducible, stateless, preemption-safe
    num_generated: int
    banned_token_ids: tuple[int, ...] = ()  # e.g. eos and stop ids before min_tokens is reached
    output_token_ids: tuple[int, ...] = ()  # only when penalties or a grammar need them
    prompt_token_ids: tuple[int, ...] = ()  # only when the repetition penalty needs them
    seq_id: int = -1  # the sequence's id in the engine: a grammar's matcher is kept per sequence


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

    @classmethod
    def uniform(cls, num_new_tokens: int, context_len: int, block_size: int, sampling: list[SeqSampling],
                token_ids: list[int] | None = None, step_id: int = 0) -> "StepBatch":
        """A made-up step (warm-up, measurement): one sequence per entry of `sampling`, each ending at
        `context_len` tokens of which its last `num_new_tokens` are new; sequence i owns the blocks
        after sequence i - 1's. Token ids default to 1."""
        num_seqs, blocks_per_seq = len(sampling), -(-context_len // block_size)
        return cls(step_id=step_id, token_ids=token_ids or [1] * (num_seqs * num_new_tokens),
                   positions=[p for _ in range(num_seqs) for p in range(context_len - num_new_tokens, context_len)],
                   query_lens=[num_new_tokens] * num_seqs, context_lens=[context_len] * num_seqs,
                   block_tables=[list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)],
                   sampling=list(sampling), prompt_scoring=[None] * num_seqs)

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
    busy_seconds: float  # time spent computing (not waiting for input)
    num_steps: int
    recent_steps: tuple[tuple[int, float, float], ...] = ()  # (step id, start, end), shared monotonic clock


@dataclass(frozen=True)
class WorkerLoaded:
    """Start-up, phase one: the worker holds its weights; this many KV blocks fit in what its host's
    budget leaves it."""

    rank: int
    num_kv_blocks: int
    hostname: str


@dataclass(frozen=True)
class AllocateKVCache:
    """Start-up, phase two: the replica's block count, the same on every rank (one block table)."""

    num_blocks: int


@dataclass(frozen=True)
class WorkerReady:
    rank: int


@dataclass(frozen=True)
class WorkerFailed:
    label: str
    error: str
    traceback: str = field(default="", repr=False)
    step_id: int | None = None  # the step it was computing, if any
