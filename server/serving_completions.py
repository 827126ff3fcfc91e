"""POST /v1/completions: prompts as text or token ids, echo, logprobs (also of the prompt), streaming."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hexcore.outputs import ChoiceDelta, TokenLogprob
from server.errors import bad_request
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
    unix_now,
)
from server.generation import Generation
from server.serving_common import OpenAIServing, event_stream, until_disconnect


class _ChoiceText:
    """Turns one choice's deltas into (text, logprobs) pieces; the first piece carries the echoed prompt.
    Streaming sends the pieces as they come, the non-streamed response joins them."""

    def __init__(self, serving: OpenAIServing, is_logprobs: bool, echo_text: str, echo_logprobs: CompletionLogprobs | None):
        self._serving = serving
        self._is_logprobs = is_logprobs
        self._pending_text = echo_text
        self._pending_logprobs = echo_logprobs
        self._text_offset = len(echo_text)  # text_offset counts characters of this choice's text
        self.text = ""
        self.logprobs = CompletionLogprobs() if is_logprobs else None
        self.finish_reason: str | None = None
        self.is_scoring_only = False

    def piece(self, delta: ChoiceDelta) -> tuple[str, CompletionLogprobs | None]:
        if self.is_scoring_only:  # max_tokens 0: the one token generated is not part of the answer
            delta = ChoiceDelta(delta.index, [], "", [], "length" if delta.finish_reason else None)
        text, self._pending_text = self._pending_text + delta.text, ""
        logprobs = None
        if self._is_logprobs:
            logprobs = self._pending_logprobs or CompletionLogprobs()
            self._pending_logprobs = None
            self._text_offset = _append_logprobs(self._serving, logprobs, delta.logprobs or [], self._text_offset)
            self.logprobs.extend(logprobs)
        self.text += text
        self.finish_reason = delta.finish_reason or self.finish_reason
        return text, logprobs


def _append_logprobs(
    serving: OpenAIServing, logprobs: CompletionLogprobs, entries: list[TokenLogprob | None], offset: int,
    token_ids: list[int] | None = None,
) -> int:
    """Append one entry per token (None: no logprob, as for the first prompt token); return the new offset."""
    for i, entry in enumerate(entries):
        token_id = entry.token_id if entry is not None else token_ids[i]
        token = serving.token_text(token_id)
        logprobs.tokens.append(token)
        logprobs.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
        else:
            logprobs.token_logprobs.append(entry.logprob)
            top = {serving.token_text(alt): value for alt, value in entry.top.items()}
            top.setdefault(token, entry.logprob)
            logprobs.top_logprobs.append(top)
    return offset


class CompletionServing(OpenAIServing):
    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        arrival_time = time.monotonic()
        self.check_request(request, request.max_tokens)
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported (only best_of equal to n)", "best_of")
        # max_tokens 0 with echo: the prompt (and its logprobs) only, as evaluation harnesses ask; the
        # engine generates one token, which is dropped
        is_scoring_only = request.max_tokens == 0
        if is_scoring_only and not request.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
        texts, prompts = await self._prompts(request.prompt)
        grammar = None if is_scoring_only else await self.grammar(request)
        is_scoring = request.echo and request.logprobs is not None
        params = self.sampling_params(
            request, 1 if is_scoring_only else request.max_tokens, request.logprobs,
            prompt_logprobs=request.logprobs if is_scoring else None, grammar=grammar,
        )
        response_id = random_id("cmpl")
        generation = await self.open_generation(raw_request, response_id, prompts, params, arrival_time)
        choices = _Choices(self, request, texts, prompts, is_scoring_only)
        head = dict(id=response_id, created=unix_now(), model=self.engine.model_name)
        if request.stream:
            return event_stream(self._stream(request, generation, choices, head), generation, self.stream_cutoff)
        await until_disconnect(raw_request, self._collect(generation, choices))
        response = CompletionResponse(**head, choices=choices.final(), usage=generation.usage(not is_scoring_only))
        return JSONResponse(response.model_dump())

    async def _prompts(self, prompt: str | list) -> tuple[list[str | None], list[list[int]]]:
        """Each prompt's text (None for token ids: decoded only if echoed) and token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            return list(prompt), [await self.encode(text) for text in prompt]
        return [None] * len(prompt), [list(ids) for ids in prompt]

    async def _collect(self, generation: Generation, choices: "_Choices") -> None:
        try:
            async for prompt_index, output in generation.outputs():
                choices.observe_prompt(prompt_index, output.prompt_logprobs)
                for delta in output.choices:
                    choices.get(prompt_index, delta.index).piece(delta)
        finally:
            await generation.close()

    async def _stream(
        self, request: CompletionRequest, generation: Generation, choices: "_Choices", head: dict
    ) -> AsyncIterator[str]:
        options = request.stream_options
        async for prompt_index, output in generation.outputs():
            choices.observe_prompt(prompt_index, output.prompt_logprobs)
            for delta in output.choices:
                text, logprobs = choices.get(prompt_index, delta.index).piece(delta)
                if not text and delta.finish_reason is None and not (logprobs and logprobs.tokens):
                    continue
                choice = CompletionChoice(
                    index=prompt_index * request.n + delta.index, text=text, logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
                usage = generation.usage(not choices.is_scoring_only) if options and options.continuous_usage_stats else None
                yield CompletionResponse(**head, choices=[choice], usage=usage).model_dump_json()
        if options and options.include_usage:
            usage = generation.usage(not choices.is_scoring_only)
            yield CompletionResponse(**head, choices=[], usage=usage).model_dump_json()


class _Choices:
    """Every choice of a request: n per prompt, numbered prompt_index * n + choice index."""

    def __init__(self, serving: CompletionServing, request: CompletionRequest, texts: list[str | None],
                 prompts: list[list[int]], is_scoring_only: bool = False):
        self.is_scoring_only = is_scoring_only
        self._serving = serving
        self._request = request
        self._texts = texts
        self._prompts = prompts
        self._prompt_logprobs: dict[int, CompletionLogprobs] = {}
        self._by_index: dict[int, _ChoiceText] = {}

    def observe_prompt(self, prompt_index: int, entries: list[TokenLogprob | None] | None) -> None:
        if entries is not None and prompt_index not in self._prompt_logprobs:
            logprobs = CompletionLogprobs()
            _append_logprobs(self._serving, logprobs, entries, 0, token_ids=self._prompts[prompt_index])
            self._prompt_logprobs[prompt_index] = logprobs

    def get(self, prompt_index: int, choice_index: int) -> _ChoiceText:
        index = prompt_index * self._request.n + choice_index
        choice = self._by_index.get(index)
        if choice is None:
            echo_text, echo_logprobs = "", None
            if self._request.echo:
                echo_text = self._texts[prompt_index]
                if echo_text is None:
                    echo_text = self._serving.tokenizer.decode(self._prompts[prompt_index])
                echo_logprobs = self._prompt_logprobs.get(prompt_index)
                echo_logprobs = echo_logprobs.model_copy(deep=True) if echo_logprobs else None
            choice = _ChoiceText(self._serving, self._request.logprobs is not None, echo_text, echo_logprobs)
            choice.is_scoring_only = self.is_scoring_only
            self._by_index[index] = choice
        return choice

    def final(self) -> list[CompletionChoice]:
        return [
            CompletionChoice(index=index, text=choice.text, logprobs=choice.logprobs, finish_reason=choice.finish_reason)
            for index, choice in sorted(self._by_index.items())
        ]
