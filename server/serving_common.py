"""What completions and chat share: model checks, tokenization off the event loop, sampling parameters,
running a request's engine streams, usage, SSE framing and abort on client disconnect."""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from hexcore.engine_client import EngineClient, EngineOverloaded
from hexcore.outputs import RequestOutput
from hexcore.sampling_params import InvalidParameter, SamplingParams
from server.errors import APIError, bad_request, internal_error
from server.metrics import RequestTracker, ServerMetrics
from server.protocol import ChatMessage, SamplingRequest, UsageInfo

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
    if isinstance(err, EngineOverloaded):
        retry_after = str(max(1, math.ceil(err.retry_after_seconds)))
        return APIError(503, f"server overloaded: {err}", code="server_overloaded", headers={"Retry-After": retry_after})
    if isinstance(err, ValueError):
        return bad_request(str(err))
    logger.error("internal error", exc_info=err)
    return internal_error()


class Generation:
    """The engine requests of one HTTP request (one per prompt), merged into one stream of
    (prompt index, output). `open` awaits every first output, so refusals become HTTP errors before any
    byte is sent; `close` aborts whatever is unfinished, at once."""

    def __init__(self, engine: EngineClient, request_ids: list[str], trackers: list[RequestTracker], num_choices: int):
        self._engine = engine
        self._request_ids = request_ids
        self.trackers = trackers
        self._num_choices = num_choices
        self._is_finished = [False] * len(request_ids)
        self._firsts: list[RequestOutput] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._is_closed = False

    @classmethod
    async def open(
        cls, engine: EngineClient, metrics: ServerMetrics, base_id: str, prompts: list[list[int]],
        params: SamplingParams, arrival_time: float,
    ) -> "Generation":
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        trackers = [RequestTracker(metrics, arrival_time) for _ in prompts]
        generation = cls(engine, request_ids, trackers, params.n)
        try:
            iterators = [engine.generate(rid, ids, params) for rid, ids in zip(request_ids, prompts)]
            firsts = await asyncio.gather(*(anext(it) for it in iterators), return_exceptions=True)
            for first in firsts:
                if isinstance(first, BaseException):
                    raise first
        except BaseException:
            await generation.close()
            raise
        generation._firsts = firsts
        for i, (iterator, first) in enumerate(zip(iterators, firsts)):
            generation._is_finished[i] = first.is_finished
            if not first.is_finished:
                generation._pumps.append(asyncio.create_task(generation._pump(i, iterator)))
        return generation

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in iterator:
                await self._queue.put((index, output, None))
            await self._queue.put((index, None, None))
        except Exception as err:  # handed to the consumer
            await self._queue.put((index, None, err))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        for index, first in enumerate(self._firsts):
            self.trackers[index].observe(first)
            yield index, first
        while not all(self._is_finished):
            index, output, err = await self._queue.get()
            if err is not None:
                raise err
            if output is None:  # the iterator ended
                if self._is_finished[index]:
                    continue
                raise RuntimeError(f"engine stream {self._request_ids[index]} ended before it finished")
            self.trackers[index].observe(output)
            self._is_finished[index] = output.is_finished
            yield index, output
        await self.close()

    async def close(self) -> None:
        """Idempotent. Shielded: it also runs while the response task is being cancelled."""
        if self._is_closed:
            return
        self._is_closed = True
        with anyio.CancelScope(shield=True):
            for pump in self._pumps:
                pump.cancel()
            for request_id, is_finished in zip(self._request_ids, self._is_finished):
                if not is_finished:
                    try:
                        await self._engine.abort(request_id)
                    except Exception:
                        logger.exception("aborting %s failed", request_id)
            for tracker in self.trackers:
                tracker.report(self._num_choices)

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(tracker.num_prompt_tokens for tracker in self.trackers)
        completion_tokens = sum(tracker.num_completion_tokens for tracker in self.trackers)
        return UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
        )


class OpenAIServing:
    """Base of the completions and chat handlers."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, tokenizer_pool: ThreadPoolExecutor):
        self.engine = engine
        self.metrics = metrics
        self._tokenizer_pool = tokenizer_pool  # one thread: HF fast tokenizers are not safe to share
        self._token_texts: dict[int, str] = {}

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_request(self, request: SamplingRequest) -> None:
        check_ready(self.engine)
        check_model(self.engine, request.model)
        if request.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    async def run_in_tokenizer_thread(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool, lambda: function(*args, **kwargs)
        )

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run_in_tokenizer_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        text = await self.run_in_tokenizer_thread(render_chat, self.tokenizer, messages, add_generation_prompt)
        return await self.encode(text, add_special_tokens=False)  # the template already holds them

    def token_text(self, token_id: int) -> str:
        """A token's own text, as logprobs report it."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def sampling_params(
        self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        try:
            return SamplingParams(
                n=request.n, max_tokens=max_tokens, min_tokens=request.min_tokens, temperature=request.temperature,
                top_p=request.top_p, top_k=request.top_k, min_p=request.min_p, seed=request.seed,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty, stop=request.stop_strings,
                stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
            )
        except InvalidParameter as err:
            raise bad_request(str(err), err.param) from None

    async def open_generation(
        self, raw_request: Request, base_id: str, prompts: list[list[int]], params: SamplingParams,
        arrival_time: float, prompt_param: str = "prompt",
    ) -> Generation:
        """Start the engine requests (the engine rejects empty, too long or out-of-vocabulary prompts);
        the access log reads their token counts from the request state."""
        try:
            generation = await Generation.open(self.engine, self.metrics, base_id, prompts, params, arrival_time)
        except Exception as err:
            error = as_api_error(err)
            if error.param == "prompt":
                error.param = prompt_param
            raise error from None
        raw_request.state.generation = generation
        return generation


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The prompt text the model's chat template makes of `messages`; 400 when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions with a plain prompt", "messages")
    conversation = []
    for message in messages:
        turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text}
        if message.name is not None:
            turn["name"] = message.name
        conversation.append(turn)
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # the template rejects the conversation (e.g. roles out of order)
        raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None


def check_ready(engine: EngineClient) -> None:
    if not engine.is_ready:
        raise APIError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})


def check_model(engine: EngineClient, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(
            400, f"model {name!r} is not served here; this server serves {engine.model_name!r}",
            param="model", code="model_not_found",
        )


def event_stream(events: AsyncIterator[str], generation: Generation) -> EventSourceResponse:
    """`data: <json>` events, then `data: [DONE]`; an error after the start becomes an error event.
    No pings or comments: strict clients accept only `data:` lines."""

    async def framed() -> AsyncIterator[str]:
        try:
            async for data in events:
                yield data
        except Exception as err:
            yield as_api_error(err).to_json()
        finally:
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
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
