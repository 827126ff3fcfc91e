"""The engine for the HTTP server: an asyncio face on EngineCore, which runs in a thread of its own.

The event loop never touches the core: it posts typed commands (add, abort) to the core thread and
receives RequestOutputs back through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from hexcore.config import DeploymentConfig
from hexcore.engine.client import EngineDead, EngineOverloaded, EngineStats
from hexcore.engine.core import EngineCore
from hexcore.model.files import default_model_name
from hexcore.outputs import RequestOutput
from hexcore.sampling_params import SamplingParams

log = logging.getLogger("hexgen.engine")


class _Wakeup:
    """A pipe the core thread waits on beside the worker pipes; any thread may set it."""

    def __init__(self):
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def set(self) -> None:
        os.write(self._write_fd, b"x")  # atomic: safe from any thread

    def clear(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass


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
    def __init__(self, config: DeploymentConfig):
        self.config = config
        self.model_name = config.served_model_name or default_model_name(config.model)
        self.max_model_len: int = 0
        self.vocab_size: int = 0
        self.tokenizer = None
        self.deployment = None
        self._core: EngineCore | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = _Wakeup()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._error: BaseException | None = None

    # lifecycle
    @property
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._start_core)
        self._thread = threading.Thread(target=self._run, name="hexgen-engine-core", daemon=True)
        self._thread.start()

    def _start_core(self) -> None:
        from transformers import AutoTokenizer

        from hexcore.executor.deployment import resolve

        self.deployment = resolve(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.deployment.model_dir)
        self.max_model_len = self.deployment.max_model_len
        self.vocab_size = self.deployment.dims.vocab_size
        self.model_name = self.deployment.model_name
        core = EngineCore(self.deployment, self.tokenizer)
        core.start()
        self._core = core

    async def shutdown(self) -> None:
        self._is_stopping = True
        self._wake()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        if self._core is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._core.shutdown)
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
                is_finished = output.is_finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not is_finished:
                self._post(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._core.stats() if self._core is not None else EngineStats([])

    # the core thread
    def _post(self, command) -> None:
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        core = self._core
        try:
            while not self._is_stopping:
                self._apply_commands(core)
                outputs = core.step(timeout=1.0, wakeup=self._wakeup)
                self._wakeup.clear()
                for output in outputs:
                    self._loop.call_soon_threadsafe(self._deliver, output.request_id, output)
        except BaseException as err:  # a worker died: fail every open request, stop serving
            log.exception("engine core stopped")
            self._error = err
            failure = err if isinstance(err, EngineDead) else EngineDead(str(err))
            for request_id in list(self._queues):
                self._loop.call_soon_threadsafe(self._deliver, request_id, failure)

    def _apply_commands(self, core: EngineCore) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                try:
                    num_waiting = sum(len(r.scheduler.waiting) for r in core.replicas)
                    if num_waiting >= self.config.server.max_waiting_requests:
                        raise EngineOverloaded(f"{num_waiting} requests are already waiting; retry later")
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
