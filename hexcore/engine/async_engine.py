"""The engine for the HTTP server: an asyncio face on EngineCore, which runs in a thread of its own.

The event loop never touches the core: it posts typed commands (add, abort) to the core thread and
receives RequestOutputs back through per-request asyncio queues; the core thread publishes a stats
snapshot that the event loop reads. A replica's failure is the core's to handle; only when the engine
stops for good (a replica that cannot be restarted) does every open request fail and `on_fatal` run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import AsyncIterator

from hexcore.engine.client import EngineDead, EngineStats, EngineUnavailable, RequestFailed
from hexcore.engine.core import EngineCore
from hexcore.executor.deployment import ResolvedDeployment
from hexcore.outputs import RequestOutput
from hexcore.sampling_params import SamplingParams

log = logging.getLogger("hexgen.engine")

_STATS_INTERVAL = 0.25  # seconds between the core thread's stats snapshots


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    accepted: concurrent.futures.Future


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, deployment: ResolvedDeployment,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.deployment = deployment
        self.model_name = deployment.model_name
        self.max_model_len = deployment.max_model_len
        self.vocab_size = deployment.dims.vocab_size
        self.tokenizer = None
        self._max_waiting = deployment.config.server.max_waiting_requests
        self._on_fatal = on_fatal
        self._core: EngineCore | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._error: BaseException | None = None
        self._stats = EngineStats([])

    # lifecycle
    @property
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = await self._loop.run_in_executor(None, EngineCore.launch, self.deployment)
        self.tokenizer = self._core.tokenizer
        self._stats = self._core.stats()
        self._thread = threading.Thread(target=self._run, name="hexgen-engine-core", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the core thread first, then the workers: no worker's exit looks like a failure."""
        self._is_stopping = True
        self._wake()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 30)
        if self._core is not None:
            await loop.run_in_executor(None, self._core.shutdown)
            self._core = None

    # requests
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDead(f"the engine has stopped: {self._error}")
        if not self.is_ready:
            raise EngineDead("the engine is not running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = outputs
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._post(_Add(request_id, list(prompt_token_ids), params, accepted))
        is_finished = False
        try:
            await asyncio.wrap_future(accepted)
            while not is_finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise output
                if output.error is not None:
                    is_finished = True
                    if output.error.is_retryable:
                        raise EngineUnavailable(output.error.message, retry_after_seconds=5.0)
                    raise RequestFailed(output.error.message)
                is_finished = output.is_finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not is_finished:
                self._post(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The core thread's latest snapshot (at most _STATS_INTERVAL old)."""
        return self._stats

    # the core thread
    def _post(self, command) -> None:
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        if self._core is not None:
            self._core.wake()

    def _run(self) -> None:
        core, stats_at = self._core, 0.0
        try:
            while not self._is_stopping:
                self._apply_commands(core)
                for output in core.step(timeout=1.0, wait_when_idle=True):
                    self._loop.call_soon_threadsafe(self._deliver, output.request_id, output)
                if time.monotonic() - stats_at >= _STATS_INTERVAL:
                    self._stats, stats_at = core.stats(), time.monotonic()
        except BaseException as err:  # the engine cannot go on: fail every open request, then tell the server
            log.error("engine stopped: %s", err, exc_info=not isinstance(err, EngineDead))
            self._error = err
            self._stats = core.stats()
            failure = err if isinstance(err, EngineDead) else EngineDead(str(err))
            for request_id in list(self._queues):
                self._loop.call_soon_threadsafe(self._deliver, request_id, failure)
            if self._on_fatal is not None:
                self._loop.call_soon_threadsafe(self._on_fatal, err)

    def _apply_commands(self, core: EngineCore) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                try:
                    core.check_admission(command.params.n, self._max_waiting)
                    core.add_request(command.request_id, command.prompt_token_ids, command.params)
                    command.accepted.set_result(None)
                except Exception as err:
                    command.accepted.set_exception(err)
            elif isinstance(command, _Abort):
                output = core.abort(command.request_id)
                if output is not None:
                    self._loop.call_soon_threadsafe(self._deliver, command.request_id, output)

    def _deliver(self, request_id: str, output) -> None:
        outputs = self._queues.get(request_id)
        if outputs is not None:
            outputs.put_nowait(output)
