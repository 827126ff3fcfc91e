"""The head's side of the cluster: one authenticated port (channel.py) that node agents join and
remote workers connect back to. The head checks each node (token, versions, the devices the
deployment names on it), keeps a heartbeat with it, asks it to start and stop workers, and hears
when they exit. A node silent for NODE_TIMEOUT_SECONDS, or whose connection breaks, is lost: the
replicas with workers there fail over like any other failure."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing import AuthenticationError

from hexcore.cluster.channel import listen, receive, send
from hexcore.cluster.host import HostInfo, hexgen_version
from hexcore.cluster.jobs import JobFailed
from hexcore.cluster.messages import (Heartbeat, JobDone, NodeHello, Refused, RunJob, StartWorker, StopWorkers, Welcome,
                                      WorkerExited, WorkerHello)
from hexcore.config import Device
from hexcore.executor.specs import WorkerSpec

log = logging.getLogger("hexgen.cluster")

HEARTBEAT_SECONDS = 1.0
NODE_TIMEOUT_SECONDS = 10.0
HANDSHAKE_SECONDS = 10.0
JOB_GRACE_SECONDS = 10.0  # past a job's own time limit, for its agent to stop it and answer


class _Node:
    def __init__(self, name: str, hello: NodeHello, conn: Connection):
        self.name, self.host, self.conn = name, hello.host, conn
        self.last_seen = time.monotonic()
        self.is_alive = True
        self.exitcodes: dict[tuple[str, int], int | None] = {}  # (store prefix, rank) -> exit code
        self.send_lock = threading.Lock()

    def send(self, message) -> None:
        with self.send_lock:
            send(self.conn, message)


class ClusterHead:
    def __init__(self, name: str, host: str, port: int, token: bytes, needs: dict[str, list[Device]]):
        """`needs`: the devices the deployment places on each node (by node name)."""
        import torch

        self.name, self.host = name, host
        self._needs = needs
        self._versions = (hexgen_version(), torch.__version__)
        self._listener = listen(host, port, token)
        self.port = self._listener.address[1]
        self.address = f"{host}:{self.port}"
        self._nodes: dict[str, _Node] = {}
        self._refused: dict[str, str] = {}
        self._worker_conns: dict[tuple[str, int], Connection] = {}
        self._job_ids = itertools.count(1)
        self._job_results: dict[int, JobDone] = {}
        self._changed = threading.Condition()
        self._is_closed = False
        threading.Thread(target=self._accept_loop, name="hexgen-cluster-accept", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="hexgen-cluster-heartbeat", daemon=True).start()

    # nodes
    def wait_for_nodes(self, names: list[str], timeout: float) -> None:
        """Block until every node in `names` has joined; ValueError naming the missing ones after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while missing := [n for n in names if not self.is_node_alive(n)]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reasons = "; ".join(f"{n}: refused: {self._refused[n]}" for n in missing if n in self._refused)
                    raise ValueError(f"nodes did not join within {timeout:.0f} s: {', '.join(missing)}"
                                     + (f" ({reasons})" if reasons else "") + f"; start `hexgen node --head "
                                     f"{self.address} --name NODE` on each")
                self._changed.wait(min(remaining, 1.0))

    def is_node_alive(self, name: str) -> bool:
        node = self._nodes.get(name)
        return node is not None and node.is_alive

    def node_host(self, name: str) -> HostInfo:
        """What a joined node reported about its host."""
        return self._nodes[name].host

    # jobs on nodes
    def run_job(self, node: str, job: object, timeout: float) -> object:
        """Run `job` (hexcore/cluster/jobs.py) on `node` and return its result; JobFailed says why there is none."""
        job_id = next(self._job_ids)
        try:
            self._nodes[node].send(RunJob(job_id, job, timeout))
        except OSError as err:
            raise JobFailed(f"node {node!r} cannot be sent {type(job).__name__}: {err}") from None
        deadline = time.monotonic() + timeout + JOB_GRACE_SECONDS
        with self._changed:
            while job_id not in self._job_results:
                if not self.is_node_alive(node):
                    raise JobFailed(f"node {node!r} was lost during {type(job).__name__}")
                if time.monotonic() > deadline:
                    raise JobFailed(f"node {node!r} did not answer {type(job).__name__} within "
                                    f"{timeout + JOB_GRACE_SECONDS:.0f} s")
                self._changed.wait(0.5)
            done = self._job_results.pop(job_id)
        if done.error is not None:
            raise JobFailed(f"{type(job).__name__} failed on node {node!r}: {done.error}")
        return done.result

    # workers on nodes
    def start_worker(self, node: str, spec: WorkerSpec) -> None:
        self._nodes[node].send(StartWorker(spec, self.address))

    def stop_workers(self, node: str, replica: str, store_prefix: str) -> None:
        link = self._nodes.get(node)
        if link is not None and link.is_alive:
            try:
                link.send(StopWorkers(replica, store_prefix))
            except OSError:
                pass

    def worker_connection(self, node: str, store_prefix: str, rank: int, timeout: float) -> Connection | None:
        """The connection a worker opened back to the head, or None if it exited or its node was lost first."""
        deadline = time.monotonic() + timeout
        key = (store_prefix, rank)
        with self._changed:
            while key not in self._worker_conns:
                if self.exit_cause(node, store_prefix, rank) is not None or time.monotonic() > deadline:
                    return None
                self._changed.wait(0.5)
            return self._worker_conns.pop(key)

    def exit_code(self, node: str, store_prefix: str, rank: int) -> int | None:
        """A worker's exit code as its agent reported it (None while it runs, or with its node lost)."""
        link = self._nodes.get(node)
        return link.exitcodes.get((store_prefix, rank)) if link is not None else None

    def exit_cause(self, node: str, store_prefix: str, rank: int) -> str | None:
        """Why a worker on `node` is gone, or None while it runs."""
        link = self._nodes.get(node)
        if link is None or not link.is_alive:
            return f"node {node!r} lost"
        code = link.exitcodes.get((store_prefix, rank), "running")
        if code == "running":
            return None
        from hexcore.executor.replica_workers import describe_exit

        return f"{describe_exit(code)} on node {node!r}"

    def close(self) -> None:
        self._is_closed = True
        self._listener.close()
        for node in list(self._nodes.values()):
            node.conn.close()

    # threads
    def _accept_loop(self) -> None:
        while not self._is_closed:
            try:
                conn = self._listener.accept()  # the HMAC challenge runs here, before any message
            except AuthenticationError:
                peer = getattr(self._listener, "last_accepted", None)
                log.error("refused a connection from %s: wrong cluster token", peer)
                continue
            except OSError:
                if self._is_closed:
                    return
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: Connection) -> None:
        try:
            if not conn.poll(HANDSHAKE_SECONDS):
                raise OSError("no hello")
            hello = receive(conn)
        except (OSError, EOFError, Exception):  # noqa: BLE001 - a peer that says nothing sensible is dropped
            conn.close()
            return
        if isinstance(hello, WorkerHello):
            with self._changed:
                self._worker_conns[(hello.store_prefix, hello.rank)] = conn
                self._changed.notify_all()
        elif isinstance(hello, NodeHello):
            self._join(hello, conn)
        else:
            conn.close()

    def _join(self, hello: NodeHello, conn: Connection) -> None:
        reason = self._refusal(hello)
        if reason is not None:
            log.error("node %r refused: %s", hello.name, reason)
            self._refused[hello.name] = reason
            try:
                send(conn, Refused(reason))
            finally:
                conn.close()
            with self._changed:
                self._changed.notify_all()
            return
        node = _Node(hello.name, hello, conn)
        node.send(Welcome(self.name))
        with self._changed:
            self._nodes[hello.name] = node
            self._refused.pop(hello.name, None)
            self._changed.notify_all()
        log.info("node %r joined from %s (%s, %d cores, %.1f GiB)", hello.name, hello.host.hostname,
                 ", ".join(hello.host.devices), hello.host.num_cores, hello.host.memory_bytes / 2**30)
        self._listen_to(node)

    def _refusal(self, hello: NodeHello) -> str | None:
        theirs, ours = (hello.host.hexgen_version, hello.host.torch_version), self._versions
        if theirs != ours:
            return (f"it runs hexgen {theirs[0]} with torch {theirs[1]}; the head runs hexgen {ours[0]} "
                    f"with torch {ours[1]}")
        if self.is_node_alive(hello.name):
            return f"a node named {hello.name!r} has already joined"
        lacking = [str(d) for d in self._needs.get(hello.name, []) if not hello.host.has(d)]
        if lacking:
            return f"the deployment places {', '.join(lacking)} on it, but it has only {', '.join(hello.host.devices)}"
        return None

    def _listen_to(self, node: _Node) -> None:
        try:
            while node.is_alive:
                if not node.conn.poll(HEARTBEAT_SECONDS):
                    continue
                message = receive(node.conn)
                node.last_seen = time.monotonic()
                if isinstance(message, WorkerExited):
                    with self._changed:
                        node.exitcodes[(message.store_prefix, message.rank)] = message.exitcode
                        self._changed.notify_all()
                elif isinstance(message, JobDone):
                    with self._changed:
                        self._job_results[message.job_id] = message
                        self._changed.notify_all()
        except (OSError, EOFError):
            pass
        self._lose(node, "its connection closed")

    def _heartbeat_loop(self) -> None:
        while not self._is_closed:
            time.sleep(HEARTBEAT_SECONDS)
            for node in list(self._nodes.values()):
                if not node.is_alive:
                    continue
                if time.monotonic() - node.last_seen > NODE_TIMEOUT_SECONDS:
                    self._lose(node, f"silent for {NODE_TIMEOUT_SECONDS:.0f} s")
                    continue
                try:
                    node.send(Heartbeat())
                except OSError:
                    self._lose(node, "its connection broke")

    def _lose(self, node: _Node, why: str) -> None:
        if not node.is_alive:
            return
        node.is_alive = False
        if not self._is_closed:
            log.error("node %r lost: %s", node.name, why)
        node.conn.close()
        with self._changed:
            self._changed.notify_all()


class RemoteWorkerProcess:
    """A worker on another host, as ReplicaWorkers sees a process: started, watched and killed
    through that host's agent."""

    def __init__(self, head: ClusterHead, node: str, spec: WorkerSpec):
        self.head, self.node, self.spec = head, node, spec
        self.pid = None

    def start(self) -> None:
        self.head.start_worker(self.node, self.spec)

    @property
    def cause(self) -> str | None:
        return self.head.exit_cause(self.node, self.spec.store_prefix, self.spec.rank)

    @property
    def exitcode(self) -> int | None:
        """As its agent reported it; None while it runs, or when its node was lost."""
        return self.head.exit_code(self.node, self.spec.store_prefix, self.spec.rank)

    def is_alive(self) -> bool:
        return self.cause is None

    def kill(self) -> None:
        self.head.stop_workers(self.node, self.spec.replica, self.spec.store_prefix)

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 0.0)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def join_cluster(config) -> ClusterHead | None:
    """For a deployment across hosts: open the cluster port and wait for every node it names (ValueError
    listing the missing ones after the join timeout). None when every device is on the head."""
    from hexcore.cluster.channel import load_token

    nodes = config.remote_nodes
    if not nodes:
        return None
    spec = config.cluster
    needs: dict[str, list[Device]] = {}
    for replica in config.replicas:
        for stage in replica.stages:
            for device in stage.parsed_devices:
                if config.node_of(device) is not None:
                    needs.setdefault(device.node, []).append(device)
    head = ClusterHead(spec.node_name, spec.host, spec.port, load_token(spec.token_file), needs)
    log.info("cluster port %s: waiting for %s", head.address, ", ".join(nodes))
    try:
        head.wait_for_nodes(nodes, spec.join_timeout_seconds)
    except BaseException:
        head.close()
        raise
    return head
