"""One HTTP request's engine requests (one per prompt) as a single stream, aborted at once when left."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import anyio

from hexcore.engine.client import EngineClient
from hexcore.outputs import RequestOutput
from hexcore.sampling_params import SamplingParams
from server.metrics import RequestTracker, ServerMetrics
from server.protocol import PromptTokensDetails, UsageInfo

logger = logging.getLogger("hexgen.server")


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
        firsts: list = [None] * len(prompts)
        try:
            iterators = [engine.generate(rid, ids, params) for rid, ids in zip(request_ids, prompts)]
            firsts = await asyncio.gather(*(anext(it) for it in iterators), return_exceptions=True)
            for first in firsts:
                if isinstance(first, BaseException):
                    raise first
        except BaseException as err:
            # A request the engine refused (overloaded, invalid) is a rejection, not a finish; one
            # whose wait was cancelled (the client left) is an abort and is counted as one.
            for tracker, first in zip(trackers, firsts):
                if isinstance(first, RequestOutput):
                    tracker.observe(first)  # admitted, now aborted: counted on the replica that had it
                tracker.is_rejected = isinstance(first, Exception) or (first is None and isinstance(err, Exception))
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

    def usage(self, count_completion: bool = True) -> UsageInfo:
        """`count_completion` False: the generated tokens were thrown away (max_tokens 0 with echo)."""
        prompt_tokens = sum(tracker.num_prompt_tokens for tracker in self.trackers)
        completion_tokens = sum(tracker.num_completion_tokens for tracker in self.trackers) if count_completion else 0
        cached_tokens = sum(tracker.num_cached_tokens for tracker in self.trackers)
        return UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )
