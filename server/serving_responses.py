"""POST /v1/responses (the Responses API) for text in and text out, on the same engine as chat: `input`
(a string, or messages with text content) and `instructions` become a chat conversation; `text.format`
is structured output as chat's response_format. Non-streamed, a `response` object; streamed, the
Responses events (response.created ... response.output_text.delta ... response.completed).

Refused with a 400 naming the field: tools, previous_response_id (no conversation state is kept),
background, reasoning, include, store: true, input items other than messages, non-text content parts."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from server.errors import APIError, bad_request
from server.generation import Generation
from server.protocol import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    ChatMessage,
    JsonSchemaFormat,
    ResponseFormat,
    StreamOptions,
    TextPart,
    _Request,
    random_id,
    unix_now,
)
from server.serving_common import OpenAIServing, event_stream, until_disconnect


class InputText(_Request):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    is_request_body = True
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto"] | None = None
    service_tier: str | None = None
    # known, not supported: a 400 naming them when set
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None


_UNSUPPORTED = {
    "tools": "tools are not supported on /v1/responses (use /v1/chat/completions)",
    "previous_response_id": "previous_response_id is not supported: no response is stored",
    "conversation": "conversation is not supported: no conversation is stored",
    "prompt": "prompt templates are not supported",
    "background": "background responses are not supported",
    "reasoning": "reasoning is not supported by this model",
    "include": "include is not supported",
    "top_logprobs": "top_logprobs is not supported on /v1/responses",
    "max_tool_calls": "max_tool_calls is not supported: tools are not",
}


class ResponsesServing(OpenAIServing):
    async def create(self, request: ResponsesRequest, raw_request: Request) -> Response:
        arrival_time = time.monotonic()
        for field, message in _UNSUPPORTED.items():
            value = getattr(request, field)
            if value not in (None, [], {}, False):
                raise bad_request(message, field)
        chat = self._as_chat(request)
        self.check_request(chat, chat.max_tokens)
        prompt = await self.encode_chat(chat.messages, add_generation_prompt=True)
        try:
            grammar = await self.grammar(chat, chat.response_format)
        except APIError as err:  # named as chat names it: rename to where the Responses API has it
            if err.param and err.param.startswith("response_format"):
                err.param = "text.format.schema" if err.param.endswith(".schema") else "text.format"
            raise
        params = self.sampling_params(chat, chat.max_tokens, None, grammar=grammar)
        response_id = random_id("resp")
        generation = await self.open_generation(raw_request, response_id, [prompt], params, arrival_time, "input")
        state = _ResponseState(request, response_id, self.engine.model_name)
        if request.stream:
            return event_stream(self._stream(state, generation), generation, self.stream_cutoff)
        await until_disconnect(raw_request, self._collect(state, generation))
        return JSONResponse(state.response(generation))

    @staticmethod
    def _as_chat(request: ResponsesRequest) -> ChatCompletionRequest:
        messages = []
        if request.instructions:
            messages.append(ChatMessage(role="system", content=request.instructions))
        if isinstance(request.input, str):
            messages.append(ChatMessage(role="user", content=request.input))
        else:
            for item in request.input:
                content = item.content if isinstance(item.content, str) else \
                    [TextPart(type="text", text=part.text) for part in item.content]
                messages.append(ChatMessage(role=item.role, content=content))
        if not messages:
            raise bad_request("input is empty", "input")
        response_format = None
        text_format = request.text.format if request.text else None
        if text_format is not None and text_format.type != "text":
            json_schema = None
            if text_format.type == "json_schema":
                json_schema = JsonSchemaFormat(name=text_format.name, schema=text_format.schema_, strict=text_format.strict)
            response_format = ResponseFormat(type=text_format.type, json_schema=json_schema)
        return ChatCompletionRequest.model_construct(
            model=request.model, messages=messages, max_tokens=request.max_output_tokens,
            max_completion_tokens=None, temperature=request.temperature, top_p=request.top_p, n=1, stop=None,
            seed=request.seed, stream=request.stream,
            stream_options=None, presence_penalty=0.0, frequency_penalty=0.0, user=request.user, logit_bias=None,
            metadata=request.metadata, store=request.store, structured_outputs=None, guided_json=None,
            guided_regex=None, guided_choice=None, guided_grammar=None, top_k=0, min_p=0.0, repetition_penalty=1.0,
            stop_token_ids=[], ignore_eos=False, min_tokens=0, skip_special_tokens=True, logprobs=False,
            top_logprobs=None, response_format=response_format, add_generation_prompt=True, tools=None,
            tool_choice=None, parallel_tool_calls=True,
        )

    async def _collect(self, state: "_ResponseState", generation: Generation) -> None:
        try:
            async for _, output in generation.outputs():
                for delta in output.choices:
                    state.add(delta.text, delta.finish_reason)
        finally:
            await generation.close()

    async def _stream(self, state: "_ResponseState", generation: Generation) -> AsyncIterator[str]:
        yield state.event("response.created", response=state.response(generation, "in_progress"))
        yield state.event("response.in_progress", response=state.response(generation, "in_progress"))
        yield state.event("response.output_item.added", output_index=0, item=state.message("in_progress", ""))
        yield state.event("response.content_part.added", item_id=state.message_id, output_index=0, content_index=0,
                          part=_text_part(""))
        async for _, output in generation.outputs():
            for delta in output.choices:
                state.add(delta.text, delta.finish_reason)
                if delta.text:
                    yield state.event("response.output_text.delta", item_id=state.message_id, output_index=0,
                                      content_index=0, delta=delta.text, logprobs=[])
        yield state.event("response.output_text.done", item_id=state.message_id, output_index=0, content_index=0,
                          text=state.text, logprobs=[])
        yield state.event("response.content_part.done", item_id=state.message_id, output_index=0, content_index=0,
                          part=_text_part(state.text))
        yield state.event("response.output_item.done", output_index=0, item=state.message(state.item_status, state.text))
        response = state.response(generation)
        yield state.event("response.completed" if response["status"] == "completed" else "response.incomplete",
                          response=response)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _ResponseState:
    def __init__(self, request: ResponsesRequest, response_id: str, model: str):
        self.request = request
        self.id = response_id
        self.message_id = random_id("msg")
        self.model = model
        self.created_at = unix_now()
        self.text = ""
        self.finish_reason: str | None = None
        self._sequence = 0

    def add(self, text: str, finish_reason: str | None) -> None:
        self.text += text
        self.finish_reason = finish_reason or self.finish_reason

    @property
    def item_status(self) -> str:
        return "incomplete" if self.finish_reason in ("length", "abort") else "completed"

    def event(self, kind: str, **fields) -> str:
        import json

        self._sequence += 1
        return json.dumps({"type": kind, "sequence_number": self._sequence - 1, **fields})

    def message(self, status: str, text: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [_text_part(text)] if status != "in_progress" else []}

    def response(self, generation: Generation, status: str | None = None) -> dict:
        request = self.request
        is_done = status is None
        status = status or ("incomplete" if self.finish_reason == "length" else "completed")
        usage = generation.usage()
        text_format = request.text.format.model_dump(by_alias=True, exclude_none=True) \
            if request.text and request.text.format else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": [self.message(self.item_status, self.text)] if is_done else [],
            "output_text": self.text if is_done else "",
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            } if is_done else None,
            "incomplete_details": {"reason": "max_output_tokens"} if is_done and status == "incomplete" else None,
            "error": None, "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "parallel_tool_calls": False,
            "tool_choice": "none", "tools": [], "text": {"format": text_format}, "metadata": request.metadata or {},
            "store": False, "previous_response_id": None, "reasoning": None, "truncation": "disabled",
            "user": request.user, "background": False,
        }
