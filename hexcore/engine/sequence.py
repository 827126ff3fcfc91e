"""A sequence is one choice of one request, as the scheduler sees it: its tokens, how many of them
are in the KV cache, the blocks holding them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hexcore.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # the choice index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # params.max_tokens, or what fits in max_model_len
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of its first full blocks
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    num_prompt_logprobs_done: int = 0  # prompt tokens already scored (prompt_logprobs)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    is_in_flight: bool = False  # part of a step whose result has not come back
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache gave it when first admitted

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Choice 0 scores the prompt for its request (the other choices share the same prompt)."""
        return (self.index == 0 and self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs_done < self.num_prompt_tokens - 1)

    def forget_cache(self) -> None:
        """Its replica failed: nothing of it is cached any more; it waits to be recomputed."""
        self.block_table, self.block_hashes = [], []
        self.num_computed_tokens, self.is_in_flight, self.status = 0, False, SequenceStatus.WAITING

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt = self.prompt_token_ids
        return (prompt[start:end] if end <= len(prompt)
                else (prompt + self.output_token_ids)[start:end])

    def max_total_tokens(self) -> int:
        """The most tokens this sequence can ever hold in the cache."""
        return self.num_prompt_tokens + self.max_tokens
