"""What completions and chat share: model checks and the edge limits, tokenization off the event loop
(one thread, bounded text), the chat template, sampling parameters, error mapping, SSE framing and
abort on client disconnect."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from hexcore.engine.client import EngineClient, EngineDead, EngineOverloaded, EngineUnavailable
from hexcore.sampling_params import GrammarSpec, InvalidParameter, SamplingParams
from server.errors import APIError, bad_request, internal_error
from server.generation import Generation
from server.limits import EdgeLimits
from server.metrics import ServerMetrics
from server.protocol import ChatMessage, ResponseFormat, SamplingRequest
from server.structured import GrammarValidator, logit_bias, requested_grammar
from server.tools import hermes_call_text, hermes_system_prompt, template_supports_tools

logger = logging.getLogger("hexgen.server")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def as_api_error(err: Exception) -> APIError:
    """How an exception from validation or the engine reaches the client."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, InvalidParameter):
        return bad_request(str(err), err.param)
    if isinstance(err, EngineDead):
        return APIError(503, f"the engine has stopped: {err}", code="service_unavailable")
    if isinstance(err, EngineUnavailable):
        retry_after = str(max(1, math.ceil(err.retry_after_seconds)))
        return APIError(503, f"service unavailable: {err}", code="service_unavailable", headers={"Retry-After": retry_after})
    if isinstance(err, EngineOverloaded):
        retry_after = str(max(1, math.ceil(err.retry_after_seconds)))
        return APIError(503, f"server overloaded: {err}", code="server_overloaded", headers={"Retry-After": retry_after})
    if isinstance(err, ValueError):
        return bad_request(str(err))
    logger.error("internal error", exc_info=err)
    return internal_error()


class OpenAIServing:
    """Base of the completions and chat handlers."""

    def __init__(
        self, engine: EngineClient, metrics: ServerMetrics, tokenizer_pool: ThreadPoolExecutor, limits: EdgeLimits,
        stream_cutoff: asyncio.Event | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.limits = limits
        self.stream_cutoff = stream_cutoff or asyncio.Event()  # set at the end of a shutdown's drain
        # One thread: HF fast tokenizers are not safe to share, and tokenization never runs on the event
        # loop. Jobs queue in arrival order; each is bounded by limits.max_text_chars.
        self._tokenizer_pool = tokenizer_pool
        self._token_texts: dict[int, str] = {}
        self.grammars = GrammarValidator()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_request(self, request: SamplingRequest, max_tokens: int | None) -> None:
        """Everything that can be checked before tokenizing (`max_tokens`: the effective one, or None)."""
        check_ready(self.engine)
        check_model(self.engine, request.model)
        if request.store:
            raise bad_request("store is not supported: this server keeps no completions (send false or omit it)",
                              "store")
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        self.limits.check_sampling(request, max_tokens)

    async def grammar(self, request: SamplingRequest, response_format: ResponseFormat | None = None
                      ) -> GrammarSpec | None:
        """The request's structured-output grammar, compiled once here (in the tokenizer thread, off the
        event loop) so that one which cannot compile is a 400 naming its field."""
        asked = requested_grammar(request, response_format)
        if asked is None:
            return None
        spec, param = asked
        self.limits.check_text_length(len(spec.source), param)
        await self.run_in_tokenizer_thread(self.grammars.check, spec, param)
        return spec

    async def run_in_tokenizer_thread(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool, lambda: function(*args, **kwargs)
        )

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of `text`; a text too long to ever fit in the context is a 400, without tokenizing."""
        self.limits.check_text_length(len(text), param)
        return await self.run_in_tokenizer_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          tools: list[dict] | None = None) -> list[int]:
        self.limits.check_text_length(sum(len(message.text) for message in messages), "messages")
        text = await self.run_in_tokenizer_thread(render_chat, self.tokenizer, messages, add_generation_prompt, tools)
        return await self.encode(text, add_special_tokens=False, param="messages")  # the template holds them

    def token_text(self, token_id: int) -> str:
        """A token's own text, as logprobs report it."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def sampling_params(
        self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
        grammar: GrammarSpec | None = None,
    ) -> SamplingParams:
        bias = logit_bias(request.logit_bias, self.engine.vocab_size)
        try:
            return SamplingParams(
                n=request.n, max_tokens=max_tokens, min_tokens=request.min_tokens, temperature=request.temperature,
                top_p=request.top_p, top_k=request.top_k, min_p=request.min_p, seed=request.seed,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty, stop=request.stop_strings,
                stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens, logit_bias=bias,
                grammar=grammar,
            )
        except InvalidParameter as err:
            raise bad_request(str(err), err.param) from None

    async def open_generation(
        self, raw_request: Request, base_id: str, prompts: list[list[int]], params: SamplingParams,
        arrival_time: float, prompt_param: str = "prompt",
    ) -> Generation:
        """Start the engine requests (the engine rejects empty or too long prompts; token ids out of the
        vocabulary are refused here, before they reach a worker). A client that leaves while they wait
        for their first token aborts them; the access log reads their token counts from the request state."""
        self.limits.check_prompt_ids(prompts, prompt_param)
        opening = Generation.open(self.engine, self.metrics, base_id, prompts, params, arrival_time)
        try:
            generation = await until_disconnect(raw_request, opening)
        except ClientDisconnected:
            raise
        except Exception as err:
            error = as_api_error(err)
            if error.param == "prompt":
                error.param = prompt_param
            raise error from None
        raw_request.state.generation = generation
        return generation


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """The prompt text the model's chat template makes of `messages` (and of `tools`, function
    definitions: see server/tools.py for templates without tool support); 400 when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions with a plain prompt", "messages")
    native = template_supports_tools(tokenizer)
    conversation = []
    for message in messages:
        turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text}
        if message.name is not None:
            turn["name"] = message.name
        if message.tool_calls:
            if native:
                turn["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                    for call in message.tool_calls]
            else:
                calls = "\n".join(hermes_call_text(c.function.name, c.function.arguments) for c in message.tool_calls)
                turn["content"] = f"{message.text}\n{calls}" if message.text else calls
        if message.role == "tool":
            if native:
                turn["tool_call_id"] = message.tool_call_id
            else:
                turn = {"role": "user", "content": f"<tool_response>\n{message.text}\n</tool_response>"}
        conversation.append(turn)
    options = {}
    if tools and native:
        options["tools"] = [{"type": "function", "function": function} for function in tools]
    elif tools:
        system = hermes_system_prompt(tools)
        if conversation and conversation[0]["role"] == "system":
            conversation[0] = {**conversation[0], "content": f"{conversation[0]['content']}\n\n{system}"}
        else:
            conversation.insert(0, {"role": "system", "content": system})
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **options)
    except Exception as err:  # the template rejects the conversation (e.g. roles out of order)
        raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def check_ready(engine: EngineClient) -> None:
    if not engine.is_ready:
        raise APIError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})


def check_model(engine: EngineClient, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(
            404, f"the model {name!r} does not exist; this server serves {engine.model_name!r}",
            param="model", code="model_not_found",
        )


def event_stream(events: AsyncIterator[str], generation: Generation, cutoff: asyncio.Event) -> EventSourceResponse:
    """`data: <json>` events, then `data: [DONE]`; an error after the start becomes an error event, and
    so does `cutoff` (the end of a shutdown's drain) for a stream still running then.
    No pings or comments: strict clients accept only `data:` lines."""

    async def framed() -> AsyncIterator[str]:
        cut = asyncio.ensure_future(cutoff.wait())
        try:
            while True:
                following = asyncio.ensure_future(anext(events))
                await asyncio.wait({following, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    yield APIError(503, "the server is shutting down; the stream was cut at the end of the drain",
                                   code="server_shutting_down").to_json()
                    break
                try:
                    yield following.result()
                except StopAsyncIteration:
                    break
        except Exception as err:
            yield as_api_error(err).to_json()
        finally:
            cut.cancel()
            await generation.close()
        yield "[DONE]"

    return EventSourceResponse(framed(), ping=0, sep="\n", background=BackgroundTask(generation.close))


async def until_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (its cleanup aborts the engine requests) if the client disconnects."""

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # the client left first: let the work's cleanup (the aborts) run, then say so
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.debug("work of a departed client ended with an error", exc_info=task.exception())
        raise ClientDisconnected()
    return task.result()
