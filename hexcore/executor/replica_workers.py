"""The worker processes of one replica, as the driver sees them: spawn, wait until every one is
ready (or say which one failed and why), broadcast steps, collect results, stop them all."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from multiprocessing.connection import Connection, wait

from hexcore.hardware import WORKER_ENVIRONMENT
from hexcore.engine.client import EngineDead
from hexcore.executor.messages import Shutdown, StatsRequest, StepBatch, StepResult, WorkerFailed, WorkerReady, WorkerStats
from hexcore.executor.specs import WorkerSpec
from hexcore.worker.main import worker_main


class WorkerStartupError(RuntimeError):
    pass


def _context():
    """Workers fork from a server process that has imported torch once, so each start is fast and
    nothing of the driver's state (threads, open files, CUDA) leaks into a worker."""
    for name, value in WORKER_ENVIRONMENT.items():  # read by the forkserver when it starts
        os.environ.setdefault(name, value)
    context = mp.get_context("forkserver")
    # the worker and what it imports to read the model's config (transformers' Llama module)
    context.set_forkserver_preload(["hexcore.worker.main", "transformers.models.llama.modeling_llama"])
    return context


class ReplicaWorkers:
    def __init__(self, specs: list[WorkerSpec]):
        self.specs = specs
        self.processes: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.stats: dict[int, WorkerStats] = {}

    def start(self, timeout: float = 600.0) -> None:
        context = _context()
        for spec in self.specs:
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(spec, child), daemon=True,
                                      name=f"hexgen-{spec.replica}-rank{spec.rank}")
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, deadline: float) -> None:
        pending = {conn: spec for conn, spec in zip(self.conns, self.specs)}
        while pending:
            ready = wait(list(pending), timeout=1.0)
            for conn in ready:
                spec = pending.pop(conn)
                try:
                    message = conn.recv()
                except EOFError:
                    process = self.processes[spec.rank]
                    process.join(timeout=5)
                    raise WorkerStartupError(
                        f"{spec.label} exited with code {process.exitcode} during startup (its stderr above says "
                        f"why; a script that starts workers needs an `if __name__ == '__main__':` guard)") from None
                if isinstance(message, WorkerFailed):
                    raise WorkerStartupError(f"{message.label} failed during startup: {message.error}")
                assert isinstance(message, WorkerReady), message
            if time.monotonic() > deadline:
                labels = ", ".join(spec.label for spec in pending.values())
                raise WorkerStartupError(f"timed out waiting for {labels} to start")

    def submit(self, batch: StepBatch) -> None:
        payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)  # once, for every worker
        for conn in self.conns:
            conn.send_bytes(payload)

    def wait_for_result(self, step_id: int, timeout: float = 600.0) -> StepResult:
        """Block until step `step_id` comes back (only while no other step is in flight)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn in wait(self.conns, timeout=1.0):
                result = self.receive(conn)
                if result is not None:
                    assert result.step_id == step_id, "no other step is in flight"
                    return result
        raise EngineDead(f"step {step_id} did not come back within {timeout:.0f} s")

    def request_stats(self) -> None:
        for conn in self.conns:
            conn.send(StatsRequest())

    def receive(self, conn: Connection) -> StepResult | None:
        """Read one message from a worker; results are returned, stats are stored, failures raise."""
        try:
            message = conn.recv()
        except (EOFError, OSError):
            rank = self.conns.index(conn)
            raise EngineDead(f"{self.specs[rank].label} died (exit code {self.processes[rank].exitcode})") from None
        if isinstance(message, WorkerFailed):
            raise EngineDead(f"{message.label} failed: {message.error}\n{message.traceback}")
        if isinstance(message, WorkerStats):
            self.stats[message.rank] = message
            return None
        return message

    def shutdown(self, timeout: float = 10.0) -> None:
        for conn in self.conns:
            try:
                conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []
