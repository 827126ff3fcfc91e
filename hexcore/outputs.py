"""What the engine reports back for a request: incremental, per choice, so the HTTP layer can stream."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob of the top alternatives


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice since the previous RequestOutput."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the choice is done


@dataclass(frozen=True)
class RequestError:
    """Why a request ended without finishing: its replica failed and no other could take it over
    (`is_retryable`: the service may serve it again soon), or computing one of its steps raised."""

    message: str
    is_retryable: bool


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    choices: list[ChoiceDelta]
    is_finished: bool  # every choice done: the last output of the stream
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only, when asked
    replica: str | None = None  # which replica serves the request
    error: RequestError | None = None  # set on the last output of a request that failed
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache instead of computed
