"""The node agent (`hexgen node`), one per host other than the head, like `ray start --address`.

It joins the head over the authenticated cluster port, reports what its host has, then starts the
workers the head asks for (each connects back to the head itself), reports their exits, and stops
them when told or when the head goes away. Without a head it retries with backoff; it stays up for
the next deployment. A wrong token or a refusal (versions, devices) ends it with status 2."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from multiprocessing import AuthenticationError

from hexcore.cluster.channel import connect, receive, send
from hexcore.cluster.head import HEARTBEAT_SECONDS, NODE_TIMEOUT_SECONDS
from hexcore.cluster.host import this_host
from hexcore.cluster.jobs import NodeJobs
from hexcore.cluster.messages import (Heartbeat, NodeHello, Refused, RunJob, StartWorker, StopWorkers, Welcome,
                                      WorkerExited, WorkerHello)
from hexcore.hardware import HostBudget

log = logging.getLogger("hexgen.node")

# a retry is one TCP connect: cheap enough every few seconds, and a new head (the next deployment) then
# waits at most this long for its agents
MAX_BACKOFF_SECONDS = 5.0


class Refusal(Exception):
    """The head will not take this node: retrying cannot help."""


def run_agent(head_host: str, head_port: int, name: str, token: bytes, budget: HostBudget) -> int:
    backoff = 1.0
    while True:
        try:
            conn = connect(head_host, head_port, token)
        except AuthenticationError:
            log.error("the head at %s:%d refused the cluster token", head_host, head_port)
            return 2
        except (OSError, EOFError) as err:  # EOFError: the head went away during the handshake
            log.warning("no head at %s:%d (%s); retrying in %.0f s", head_host, head_port,
                        getattr(err, "strerror", None) or err or "the connection closed", backoff)
            time.sleep(backoff)
            backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
            continue
        backoff = 1.0
        try:
            _serve_head(conn, name, token, budget)
        except Refusal as refusal:
            log.error("the head refused node %r: %s", name, refusal)
            return 2
        except (OSError, EOFError) as err:
            log.warning("lost the head (%s); its workers are stopped; reconnecting", err or type(err).__name__)


def _serve_head(conn, name: str, token: bytes, budget: HostBudget) -> None:
    send(conn, NodeHello(name, this_host(budget)))
    answer = receive(conn)
    if isinstance(answer, Refused):
        raise Refusal(answer.reason)
    assert isinstance(answer, Welcome), answer
    log.info("joined the head (node %r, head %r)", name, answer.head)
    workers, send_lock, is_done = _Workers(token, budget), threading.Lock(), threading.Event()
    jobs = NodeJobs()  # measurements the head asks for (hexgen calibrate --nodes)

    def to_head(message) -> None:
        with send_lock:
            send(conn, message)

    def heartbeats() -> None:  # a thread of its own: starting a worker may take seconds
        while not is_done.wait(HEARTBEAT_SECONDS):
            try:
                to_head(Heartbeat())
            except OSError:
                return

    threading.Thread(target=heartbeats, name="hexgen-node-heartbeat", daemon=True).start()
    last_heard = time.monotonic()
    try:
        while True:
            if conn.poll(0.2):
                message = receive(conn)
                last_heard = time.monotonic()
                if isinstance(message, StartWorker):
                    workers.start(message)
                elif isinstance(message, StopWorkers):
                    workers.stop(message.store_prefix)
                elif isinstance(message, RunJob):
                    jobs.start(message)
            if time.monotonic() - last_heard > NODE_TIMEOUT_SECONDS and not conn.poll(0):
                raise OSError(f"the head was silent for {NODE_TIMEOUT_SECONDS:.0f} s")
            for exited in workers.reap():
                to_head(exited)
            for done in jobs.reap():
                to_head(done)
    finally:
        is_done.set()
        workers.stop_all()  # orphaned workers must not linger
        jobs.stop_all()
        conn.close()


class _Workers:
    """The worker processes this agent started, by (store prefix, rank)."""

    def __init__(self, token: bytes, budget: HostBudget):
        self.token, self.budget = token, budget
        self.processes: dict[tuple[str, int], tuple[str, object]] = {}  # -> (replica, process)

    def start(self, order: StartWorker) -> None:
        from hexcore.executor.replica_workers import worker_context

        spec = dataclasses.replace(order.spec, host_budget=self.budget)  # this host's terms
        process = worker_context().Process(target=remote_worker_main, args=(spec, order.head_address, self.token),
                                           daemon=True, name=f"hexgen-{spec.replica}-rank{spec.rank}")
        process.start()
        self.processes[(spec.store_prefix, spec.rank)] = (spec.replica, process)
        log.info("started %s (pid %d)", spec.label, process.pid)

    def stop(self, store_prefix: str) -> None:
        for (prefix, _rank), (_replica, process) in self.processes.items():
            if prefix == store_prefix and process.is_alive():
                process.kill()

    def stop_all(self) -> None:
        for _replica, process in self.processes.values():
            if process.is_alive():
                process.kill()
        for _replica, process in self.processes.values():
            process.join(timeout=5)
        self.processes.clear()

    def reap(self) -> list[WorkerExited]:
        exited = []
        for (prefix, rank), (replica, process) in list(self.processes.items()):
            if not process.is_alive():
                process.join(timeout=1)
                exited.append(WorkerExited(replica, prefix, rank, process.exitcode))
                del self.processes[(prefix, rank)]
        return exited


def remote_worker_main(spec, head_address: str, token: bytes) -> None:
    """A worker on this host: its driver channel is a connection back to the head."""
    from hexcore.worker.main import worker_main

    host, port = head_address.rsplit(":", 1)
    conn = connect(host.strip("[]"), int(port), token)
    send(conn, WorkerHello(spec.store_prefix, spec.rank))
    worker_main(spec, conn)
