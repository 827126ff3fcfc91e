"""The worker processes of one replica, as the driver sees them: spawn, wait until every one is
ready (or say which one failed and why), send each its part of every step, collect results, stop them all.

Every way a worker can fail reaches the driver as a `WorkerFailure` naming the worker and the cause:
its exit (code or signal), a broken pipe, or the exception it reported. Each start rendezvouses on a
fresh key prefix of the driver's store, so a replica can be started again after its workers were
killed."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import pickle
import signal
import time
from multiprocessing.connection import Connection, wait

from hexcore.executor.messages import (AllocateKVCache, Shutdown, StatsRequest, StepBatch, StepResult, WorkerFailed,
                                       WorkerLoaded, WorkerReady, WorkerStats)
from hexcore.cluster.channel import receive
from hexcore.cluster.head import ClusterHead, RemoteWorkerProcess
from hexcore.executor.rendezvous import Rendezvous
from hexcore.executor.specs import WorkerSpec
from hexcore.executor.step_messages import Role, StepMessages
from hexcore.worker.main import worker_main

log = logging.getLogger("hexgen.engine")


class WorkerFailure(RuntimeError):
    """A worker of the replica exited, stopped answering, or reported an exception."""

    def __init__(self, spec: WorkerSpec, cause: str, step_id: int | None = None):
        super().__init__(f"{spec.label}: {cause}")
        self.spec, self.cause, self.step_id = spec, cause, step_id


class WorkerStartupError(RuntimeError):
    pass


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def worker_context():
    """Workers fork from a server process that has imported torch once, so each start is fast and
    nothing of the driver's state (threads, open files, CUDA) leaks into a worker."""
    context = mp.get_context("forkserver")
    # the worker and what it imports to read the model's config (transformers' Llama module)
    context.set_forkserver_preload(["hexcore.worker.main", "transformers.models.llama.modeling_llama"])
    return context


class ReplicaWorkers:
    def __init__(self, specs: list[WorkerSpec], rendezvous: Rendezvous, cluster: ClusterHead | None = None):
        self.specs = specs
        self.rendezvous = rendezvous
        self.cluster = cluster  # starts the workers whose spec names another node
        self.processes: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.stats: dict[int, WorkerStats] = {}
        self.num_kv_blocks = 0  # the replica's, once started
        self.roles = [Role.of(spec) for spec in specs]  # by rank
        self.step_messages = StepMessages(self.roles)  # what these workers know: new workers know nothing

    def start(self, num_kv_blocks: int | None, max_num_kv_blocks: int, timeout: float = 600.0) -> None:
        """Start every worker; once all hold their weights, give each the replica's KV block count:
        `num_kv_blocks` if configured, else the fewest any worker's host has room for, at most
        `max_num_kv_blocks`."""
        context = worker_context()
        prefix = self.rendezvous.new_prefix(self.specs[0].replica)
        self.specs = [dataclasses.replace(spec, store_address=self.rendezvous.address, store_prefix=prefix)
                      for spec in self.specs]
        deadline = time.monotonic() + timeout
        try:
            for spec in self.specs:
                if spec.node is None:
                    parent, child = context.Pipe()
                    process = context.Process(target=worker_main, args=(spec, child), daemon=True,
                                              name=f"hexgen-{spec.replica}-rank{spec.rank}")
                    process.start()
                    child.close()
                else:  # the node's agent starts it; it connects back to the head
                    assert self.cluster is not None, f"{spec.label} is on node {spec.node!r} but no cluster was joined"
                    process, parent = RemoteWorkerProcess(self.cluster, spec.node, spec), None
                    process.start()
                self.processes.append(process)
                self.conns.append(parent)
            for rank, spec in enumerate(self.specs):
                if self.conns[rank] is None:
                    self.conns[rank] = self._remote_connection(spec, deadline)
            loaded = self._wait_for(WorkerLoaded, deadline)
            worst = min(loaded, key=lambda message: message.num_kv_blocks)
            if worst.num_kv_blocks < 1:
                raise WorkerStartupError(f"{self.specs[worst.rank].label} on host {worst.hostname!r} has no room "
                                         f"for a single KV block beside its weights")
            self.num_kv_blocks = num_kv_blocks or min(worst.num_kv_blocks, max_num_kv_blocks)
            log.info("replica %s: %d KV blocks (room for %s)", self.specs[0].replica, self.num_kv_blocks,
                     ", ".join(f"{m.num_kv_blocks} on rank {m.rank} ({m.hostname})" for m in loaded))
            for conn in self.conns:
                conn.send(AllocateKVCache(self.num_kv_blocks))
            self._wait_for(WorkerReady, deadline)
        except BaseException:
            self.kill()
            raise

    def _remote_connection(self, spec: WorkerSpec, deadline: float) -> Connection:
        conn = self.cluster.worker_connection(spec.node, spec.store_prefix, spec.rank, deadline - time.monotonic())
        if conn is None:
            cause = self.cluster.exit_cause(spec.node, spec.store_prefix, spec.rank) or "it did not connect back in time"
            raise WorkerStartupError(f"{spec.label} on node {spec.node!r} failed during startup: {cause}")
        return conn

    def _wait_for(self, kind: type, deadline: float) -> list:
        """One message of type `kind` from every worker, by rank."""
        pending, received = {conn: spec for conn, spec in zip(self.conns, self.specs)}, {}
        while pending:
            ready = wait(list(pending), timeout=1.0)
            for conn in ready:
                spec = pending.pop(conn)
                try:
                    message = receive(conn)
                except EOFError:
                    process = self.processes[spec.rank]
                    process.join(timeout=5)
                    raise WorkerStartupError(
                        f"{spec.label} {describe_exit(process.exitcode)} during startup (its stderr above says "
                        f"why; a script that starts workers needs an `if __name__ == '__main__':` guard)") from None
                if isinstance(message, WorkerFailed):
                    raise WorkerStartupError(f"{message.label} failed during startup: {message.error}")
                assert isinstance(message, kind), message
                received[spec.rank] = message
            if time.monotonic() > deadline:
                labels = ", ".join(spec.label for spec in pending.values())
                raise WorkerStartupError(f"timed out waiting for {labels} to start")
        return [received[rank] for rank in sorted(received)]

    def submit(self, batch: StepBatch) -> None:
        """Send each rank its role's message for the step, pickled once per role."""
        payloads = {role: pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
                    for role, message in self.step_messages.build(batch).items()}
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payloads[self.roles[rank]])
            except OSError as err:  # a broken pipe: the worker is gone
                raise self._failure(rank, f"broken pipe ({err.strerror or err})") from None

    def forget(self, seq_ids: list[int]) -> None:
        """Sequences whose blocks were freed: the workers drop what they keep of them with the next step."""
        self.step_messages.forget(seq_ids)

    def wait_for_result(self, step_id: int, timeout: float) -> StepResult:
        """Block until step `step_id` comes back (only while no other step is in flight)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn in wait(self.conns, timeout=1.0):
                result = self.receive(conn)
                if result is not None:
                    assert result.step_id == step_id, "no other step is in flight"
                    return result
        raise WorkerFailure(self.specs[0], f"step {step_id} did not come back within {timeout:.0f} s")

    def request_stats(self) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(StatsRequest())
            except OSError as err:
                raise self._failure(rank, f"broken pipe ({err.strerror or err})") from None

    def receive(self, conn: Connection) -> StepResult | None:
        """Read one message from a worker; results are returned, stats are stored, failures raise."""
        rank = self.conns.index(conn)
        try:
            message = receive(conn)  # bounded: a remote worker's connection crosses the network
        except (EOFError, OSError):
            raise self._failure(rank) from None
        if isinstance(message, WorkerFailed):
            # a peer's death makes the others' collectives raise: blame the death, not the step
            raise self._dead_peer(rank, wait=1.0) or WorkerFailure(self.specs[rank], f"raised {message.error}",
                                                                   message.step_id)
        if isinstance(message, WorkerStats):
            self.stats[message.rank] = message
            return None
        return message

    def _failure(self, rank: int, cause: str | None = None) -> WorkerFailure:
        process = self.processes[rank]
        process.join(timeout=1.0)
        return WorkerFailure(self.specs[rank], cause or getattr(process, "cause", None) or describe_exit(process.exitcode))

    def _dead_peer(self, reporter: int, wait: float) -> WorkerFailure | None:
        """A failure for a worker other than `reporter` that died (killed, crashed, or its node lost; not
        one that exited cleanly after reporting an exception), if one has or does within `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            for rank, process in enumerate(self.processes):
                if rank != reporter and not process.is_alive() and process.exitcode != 0:
                    return self._failure(rank)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def lost_node(self) -> WorkerFailure | None:
        """A failure for the first worker whose node the head has lost (its connections may never break)."""
        for rank, spec in enumerate(self.specs):
            if spec.node is not None and self.processes and not self.cluster.is_node_alive(spec.node):
                return WorkerFailure(spec, f"node {spec.node!r} lost")
        return None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop, then kill those still running after `timeout`."""
        for conn in self.conns:
            try:
                conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Stop every worker at once (SIGKILL): after a failure, its peers may be blocked in a collective."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=5)
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self.processes, self.conns = [], []
