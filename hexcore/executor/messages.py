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


@dataclass(frozen=True, slots=True)
class PromptScoring:
    """Score prompt tokens: chunk row first_row + i predicts target_ids[i] (the prompt token after it)."""

    first_row: int
    target_ids: list[int]
    num_top: int


@dataclass(frozen=True)
class StepBatch:
    """One forward pass of a replica over a micro-batch: tokens of all its sequences, concatenated.

    The driver builds the whole step; its workers never receive it. Each rank gets only its role's
    `StepMessage` and rebuilds from it, and from what it keeps of each sequence (worker/seq_state.py),
    the part it runs: ranks that receive hidden states have no token ids, ranks before the last stage
    score nothing (`sampled`, `sampling` and `prompt_scoring` empty), and last-stage ranks that do not
    sample know which rows are sampled but not how (`sampling` all None)."""

    step_id: int
    seq_ids: list[int]  # per sequence: its id in the engine
    token_ids: list[int]  # [T]
    query_lens: list[int]  # per sequence: new tokens this step
    context_lens: list[int]  # per sequence: tokens in the cache after this step
    block_tables: list[list[int]]  # per sequence
    sampled: list[bool]  # per sequence: this chunk ends its known tokens, its next token is sampled
    sampling: list[SeqSampling | None]  # per sequence: how it is sampled; None where it is not
    prompt_scoring: list[PromptScoring | None]  # per sequence, when prompt logprobs are asked

    @classmethod
    def uniform(cls, num_new_tokens: int, context_len: int, block_size: int, sampling: list[SeqSampling],
                token_ids: list[int] | None = None, step_id: int = 0) -> "StepBatch":
        """A made-up step (warm-up, measurement): one sequence per entry of `sampling` (ids 0, 1, ...),
        each ending at `context_len` tokens of which its last `num_new_tokens` are new; sequence i owns
        the blocks after sequence i - 1's. Token ids default to 1."""
        num_seqs, blocks_per_seq = len(sampling), -(-context_len // block_size)
        return cls(step_id=step_id, seq_ids=list(range(num_seqs)),
                   token_ids=token_ids or [1] * (num_seqs * num_new_tokens),
                   query_lens=[num_new_tokens] * num_seqs, context_lens=[context_len] * num_seqs,
                   block_tables=[list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)],
                   sampled=[True] * num_seqs, sampling=list(sampling), prompt_scoring=[None] * num_seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def positions(self) -> list[int]:
        """[T]: each sequence's new tokens are the last `query_len` of its `context_len`."""
        return [p for n, end in zip(self.query_lens, self.context_lens) for p in range(end - n, end)]

    def scored_rows(self) -> tuple[list[int], list[int]]:
        """Rows of the step's hidden states to score: each sampled sequence's last row, then the
        prompt rows whose next token is scored."""
        sample_rows, prompt_rows, end = [], [], 0
        for n, is_sampled, scoring in zip(self.query_lens, self.sampled, self.prompt_scoring):
            end += n
            if is_sampled:
                sample_rows.append(end - 1)
            if scoring:
                first = end - n + scoring.first_row
                prompt_rows.extend(range(first, first + len(scoring.target_ids)))
        return sample_rows, prompt_rows


# What the driver sends each rank per step: only what the rank needs and does not know yet (the driver
# keeps a mirror of that, executor/step_messages.py; the worker keeps the state, worker/seq_state.py).
# Slotted, so that they pickle their fields by position, without the field names.

@dataclass(frozen=True, slots=True)
class SeqStart:
    """What the sampling rank keeps of a sequence from the first step that samples it, while the
    sequence holds its blocks: constant for that long."""

    params: SamplingParams
    seed: int
    num_prompt_tokens: int  # a sampled row's output tokens so far: its context length minus these
    prompt_token_ids: tuple[int, ...] = ()  # only when the repetition penalty needs them


@dataclass(frozen=True, slots=True)
class StepSampling:
    """The sampling rank's part of a step (the last stage's TP leader), each by sequence id."""

    new_seqs: dict[int, SeqStart]  # sequences sampled here for the first time
    new_output_ids: dict[int, list[int]]  # output tokens since the sequence's previous step here (penalties, grammar)
    banned_token_ids: dict[int, tuple[int, ...]]  # this step's bans (eos and stop ids before min_tokens)


@dataclass(frozen=True, slots=True)
class StepMessage:
    """One step of a replica as the ranks of one role receive it (first stage, middle, last stage,
    the last stage's sampling rank; built and pickled once per role). Per sequence, in the step's order:
    its id, new tokens, context length after the step and the block ids appended to its table since
    the rank last saw it (the whole table when the rank does not know it yet)."""

    step_id: int
    seq_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    new_block_ids: list[list[int]]
    dropped_seq_ids: list[int]  # their blocks were freed (finished, aborted, preempted): forget them first
    token_ids: list[int] | None = None  # [T], first stage only
    unsampled: list[int] | None = None  # last stage only: indices into seq_ids of the sequences not sampled
    prompt_scoring: list[PromptScoring | None] | None = None  # last stage only, when some sequence is scored
    sampling: StepSampling | None = None  # the sampling rank only


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
