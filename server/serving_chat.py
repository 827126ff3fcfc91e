"""POST /v1/chat/completions: messages (and tools) through the tokenizer's chat template, role chunk first;
tool calls parsed from the output (server/tools.py)."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hexcore.grammar import closed_objects, json_schema_spec
from hexcore.outputs import ChoiceDelta
from hexcore.sampling_params import GrammarSpec
from server.errors import bad_request
from server.protocol import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
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
from server.tools import (
    ParsedCall,
    check_tool_choice,
    may_start_tool_call,
    named_call_schema,
    new_call_id,
    parse_required_calls,
    parse_tool_calls,
    required_calls_schema,
    tool_call_start,
    tool_format,
)


class ToolMode:
    """How one request's replies become messages: plain text ("none"), parsed calls ("auto"), a JSON list
    of calls ("required") or the arguments of one named function ("named")."""

    def __init__(self, request: ChatCompletionRequest, tokenizer):
        self.functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools or []]
        choice = request.tool_choice or ("auto" if self.functions else "none")
        self.named = check_tool_choice(choice, self.functions)
        self.kind = "named" if self.named else choice if self.functions else "none"
        self.names = {f["name"] for f in self.functions}
        self.format = tool_format(tokenizer)
        self.parallel = request.parallel_tool_calls

    @property
    def prompt_tools(self) -> list[dict] | None:
        return self.functions if self.kind != "none" else None

    def grammar(self) -> GrammarSpec | None:
        def parameters(function: dict) -> dict:
            schema = named_call_schema(function)
            return closed_objects(schema) if function.get("strict") else schema

        if self.kind == "named":
            return json_schema_spec(parameters(next(f for f in self.functions if f["name"] == self.named)))
        if self.kind == "required":
            functions = [{**f, "parameters": parameters(f)} for f in self.functions]
            return json_schema_spec(required_calls_schema(functions, self.parallel))
        return None

    def calls(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished reply."""
        if self.kind == "named":
            return None, [ParsedCall(self.named, text)]
        if self.kind == "required":  # cut by max_tokens, the list may not parse: then it is content
            calls = parse_required_calls(text)
            return (None if calls else text), calls
        if self.kind == "auto":
            content, calls = parse_tool_calls(text, self.format, self.names)
            return content, calls[: None if self.parallel else 1]
        return text, []

    def finish_reason(self, reason: str | None, calls: list[ParsedCall]) -> str | None:
        """OpenAI: "tool_calls" when the model chose to call; a named choice ends with "stop"."""
        if reason == "stop" and calls and self.kind != "named":
            return "tool_calls"
        return reason

    def message(self, text: str, reason: str | None) -> tuple[AssistantMessage, str | None]:
        content, calls = self.calls(text)
        tool_calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls] or None
        return AssistantMessage(content=content, tool_calls=tool_calls), self.finish_reason(reason, calls)


class ToolStream:
    """One choice's streamed deltas with tools: content streams as it comes, except what may be a tool
    call, which is held back until the reply ends and then sent as delta.tool_calls (a named call's
    arguments stream as they come)."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.text = ""  # the whole reply so far
        self.sent = 0  # characters of it sent as content
        self.is_holding = False  # a tool call has started: nothing more is sent until the end
        self.call_id = new_call_id()

    def add(self, text: str) -> list[DeltaMessage]:
        mode, self.text = self.mode, self.text + text
        if mode.kind == "named":
            first = self.sent == 0 and not self.is_holding
            if not text and not first:
                return []
            self.is_holding = True
            function = DeltaFunctionCall(name=mode.named if first else None, arguments=text)
            return [DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=self.call_id if first else None,
                                                            type="function" if first else None, function=function)])]
        if mode.kind == "required" or self.is_holding:
            return []
        if mode.kind == "none":
            self.sent = len(self.text)
            return [DeltaMessage(content=text)] if text else []
        start = tool_call_start(self.text, mode.format)
        if start is not None:
            self.is_holding = True
            end = start if self.text[:start].strip() else self.sent  # a blank prefix is no content
        elif not self.text.strip():
            end = self.sent  # nothing but blanks so far: held, it may precede a call
        else:
            end = len(self.text) - may_start_tool_call(self.text, mode.format)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return [DeltaMessage(content=piece)] if piece else []

    def finish(self) -> tuple[list[DeltaMessage], list[ParsedCall]]:
        """The deltas still owed at the end of the reply, and its calls."""
        mode = self.mode
        if mode.kind == "named":
            return [], [ParsedCall(mode.named, self.text)]
        if mode.kind == "none":
            return [], []
        content, calls = mode.calls(self.text)
        if not calls:
            rest = self.text[self.sent:]
            return ([DeltaMessage(content=rest)] if rest else []), []
        deltas = []
        if content and len(content) > self.sent:
            deltas.append(DeltaMessage(content=content[self.sent:]))
        deltas += [DeltaMessage(tool_calls=[DeltaToolCall(index=i, id=new_call_id(), type="function",
                                                          function=DeltaFunctionCall(name=c.name, arguments=c.arguments))])
                   for i, c in enumerate(calls)]
        return deltas, calls


class ChatServing(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival_time = time.monotonic()
        self.check_request(request, request.requested_max_tokens)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        mode = ToolMode(request, self.tokenizer)
        prompt = await self.encode_chat(request.messages, request.add_generation_prompt, mode.prompt_tools)
        grammar = await self.grammar(request, request.response_format)
        tool_grammar = mode.grammar()
        if tool_grammar is not None:
            if grammar is not None:
                raise bad_request(f"tool_choice {mode.kind!r} constrains the output: it cannot be combined with "
                                  "another structured output", "tool_choice")
            self.limits.check_text_length(len(tool_grammar.source), "tools")
            await self.run_in_tokenizer_thread(self.grammars.check, tool_grammar, "tools")
            grammar = tool_grammar
        params = self.sampling_params(
            request, request.requested_max_tokens, (request.top_logprobs or 0) if request.logprobs else None,
            grammar=grammar,
        )
        response_id = random_id("chatcmpl")
        generation = await self.open_generation(raw_request, response_id, [prompt], params, arrival_time, "messages")
        head = dict(id=response_id, created=unix_now(), model=self.engine.model_name)
        if request.stream:
            return event_stream(self._stream(request, generation, head, mode), generation, self.stream_cutoff)
        choices = await until_disconnect(raw_request, self._collect(request, generation, mode))
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

    async def _collect(self, request: ChatCompletionRequest, generation: Generation, mode: ToolMode) -> list[ChatChoice]:
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
        choices = []
        for i in range(request.n):
            message, finish_reason = mode.message(texts[i], finish_reasons[i])
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs[i], finish_reason=finish_reason))
        return choices

    async def _stream(self, request: ChatCompletionRequest, generation: Generation, head: dict,
                      mode: ToolMode) -> AsyncIterator[str]:
        options = request.stream_options
        is_continuous_usage = bool(options and options.continuous_usage_stats)

        def chunk(choice: ChatChunkChoice) -> str:
            usage = generation.usage() if is_continuous_usage else None
            return ChatCompletionChunk(**head, choices=[choice], usage=usage).model_dump_json()

        for index in range(request.n):
            yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        streams = [ToolStream(mode) for _ in range(request.n)]
        async for _, output in generation.outputs():
            for delta in output.choices:
                logprobs = self._logprobs(delta, request.top_logprobs or 0) if request.logprobs else None
                if mode.kind == "none":
                    if not delta.text and delta.finish_reason is None and not (logprobs and logprobs.content):
                        continue
                    yield chunk(ChatChunkChoice(
                        index=delta.index, delta=DeltaMessage(content=delta.text or None), logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                    ))
                    continue
                stream = streams[delta.index]
                pieces = stream.add(delta.text)
                finish_reason = None
                if delta.finish_reason is not None:
                    more, calls = stream.finish()
                    pieces += more
                    finish_reason = mode.finish_reason(delta.finish_reason, calls)
                if not pieces and (finish_reason is not None or (logprobs and logprobs.content)):
                    pieces = [DeltaMessage()]
                for i, piece in enumerate(pieces):
                    is_last = i == len(pieces) - 1
                    yield chunk(ChatChunkChoice(index=delta.index, delta=piece, logprobs=logprobs if i == 0 else None,
                                                finish_reason=finish_reason if is_last else None))
        if options and options.include_usage:
            yield ChatCompletionChunk(**head, choices=[], usage=generation.usage()).model_dump_json()
