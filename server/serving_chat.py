"""POST /v1/chat/completions: messages through the tokenizer's chat template, role chunk first."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hexcore.outputs import ChoiceDelta
from server.errors import bad_request
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
    unix_now,
)
from server.generation import Generation
from server.serving_common import OpenAIServing, event_stream, until_disconnect


class ChatServing(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival_time = time.monotonic()
        self.check_request(request, request.requested_max_tokens)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        prompt = await self.encode_chat(request.messages, request.add_generation_prompt)
        grammar = await self.grammar(request, request.response_format)
        params = self.sampling_params(
            request, request.requested_max_tokens, (request.top_logprobs or 0) if request.logprobs else None,
            grammar=grammar,
        )
        response_id = random_id("chatcmpl")
        generation = await self.open_generation(raw_request, response_id, [prompt], params, arrival_time, "messages")
        head = dict(id=response_id, created=unix_now(), model=self.engine.model_name)
        if request.stream:
            return event_stream(self._stream(request, generation, head), generation)
        choices = await until_disconnect(raw_request, self._collect(request, generation))
        response = ChatCompletionResponse(**head, choices=choices, usage=generation.usage())
        return JSONResponse(response.model_dump())

    def _token_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    def _logprobs(self, delta: ChoiceDelta, num_top: int) -> ChatLogprobs:
        content = []
        for entry in delta.logprobs or []:
            sampled = self._token_logprob(entry.token_id, entry.logprob)
            top = sorted(entry.top.items(), key=lambda item: -item[1])[:num_top]
            content.append(ChatTokenLogprob(
                **sampled.model_dump(), top_logprobs=[self._token_logprob(token_id, value) for token_id, value in top]
            ))
        return ChatLogprobs(content=content)

    async def _collect(self, request: ChatCompletionRequest, generation: Generation) -> list[ChatChoice]:
        texts = [""] * request.n
        logprobs = [ChatLogprobs(content=[]) if request.logprobs else None for _ in range(request.n)]
        finish_reasons: list[str | None] = [None] * request.n
        try:
            async for _, output in generation.outputs():
                for delta in output.choices:
                    texts[delta.index] += delta.text
                    finish_reasons[delta.index] = delta.finish_reason or finish_reasons[delta.index]
                    if request.logprobs:
                        logprobs[delta.index].content += self._logprobs(delta, request.top_logprobs or 0).content
        finally:
            await generation.close()
        return [
            ChatChoice(index=i, message=AssistantMessage(content=texts[i]), logprobs=logprobs[i], finish_reason=finish_reasons[i])
            for i in range(request.n)
        ]

    async def _stream(self, request: ChatCompletionRequest, generation: Generation, head: dict) -> AsyncIterator[str]:
        options = request.stream_options
        is_continuous_usage = bool(options and options.continuous_usage_stats)

        def chunk(choice: ChatChunkChoice) -> str:
            usage = generation.usage() if is_continuous_usage else None
            return ChatCompletionChunk(**head, choices=[choice], usage=usage).model_dump_json()

        for index in range(request.n):
            yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        async for _, output in generation.outputs():
            for delta in output.choices:
                logprobs = self._logprobs(delta, request.top_logprobs or 0) if request.logprobs else None
                if not delta.text and delta.finish_reason is None and not (logprobs and logprobs.content):
                    continue
                yield chunk(ChatChunkChoice(
                    index=delta.index, delta=DeltaMessage(content=delta.text or None), logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                ))
        if options and options.include_usage:
            yield ChatCompletionChunk(**head, choices=[], usage=generation.usage()).model_dump_json()
