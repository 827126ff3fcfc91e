"""The engine as the HTTP layer sees it. `hexcore.engine.async_engine.AsyncEngine` implements it; unit tests of
the server may implement it with a fake."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from hexcore.outputs import RequestOutput
from hexcore.sampling_params import SamplingParams


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429/503 with Retry-After)."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineUnavailable(EngineOverloaded):
    """No replica is up (they are restarting): the caller should retry later (HTTP 503 with Retry-After)."""


class EngineDead(RuntimeError):
    """The engine has stopped for good (a replica could not be restarted): the server exits."""


class RequestFailed(RuntimeError):
    """Computing one of the request's steps raised in a worker; the request cannot be served."""


@dataclass(frozen=True)
class ReplicaStats:
    name: str
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_preemptions: int
    num_prompt_tokens: int  # totals since start
    num_generated_tokens: int
    num_steps: int
    mean_step_seconds: float
    stage_busy_fraction: list[float] = field(default_factory=list)  # per stage: busy time / wall time
    is_up: bool = True
    down_reason: str | None = None  # why it is down (the last failure), while it is
    num_restarts: int = 0  # times it was started again after a failure
    num_resumed: int = 0  # requests moved from it to other replicas after its failures


@dataclass(frozen=True)
class EngineStats:
    replicas: list[ReplicaStats]


class EngineClient(Protocol):
    model_name: str  # served model name
    max_model_len: int
    vocab_size: int  # token ids are in [0, vocab_size): the model's embedding rows
    tokenizer: object  # a transformers PreTrainedTokenizerBase

    @property
    def is_ready(self) -> bool: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Raises, before the first output, ValueError (InvalidParameter
        with `.param` where one parameter is to blame) for a request that can never be served (prompt
        plus max_tokens over max_model_len or over the KV capacity), EngineOverloaded when the waiting
        queue is full. Closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...
