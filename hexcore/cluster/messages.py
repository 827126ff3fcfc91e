"""Typed messages of the cluster channel (channel.py): between the head and a node agent, and the
first message of a remote worker's connection back to the head."""

from __future__ import annotations

from dataclasses import dataclass

from hexcore.cluster.host import HostInfo
from hexcore.executor.specs import WorkerSpec


@dataclass(frozen=True)
class NodeHello:
    """An agent's first message: who it is and what its host has."""

    name: str
    host: HostInfo


@dataclass(frozen=True)
class Welcome:
    head: str  # the head's node name


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    """Sent every HEARTBEAT_SECONDS each way: silence means the peer or the link is gone."""


@dataclass(frozen=True)
class StartWorker:
    spec: WorkerSpec
    head_address: str  # host:port of the head's cluster port, where the worker connects back


@dataclass(frozen=True)
class StopWorkers:
    replica: str
    store_prefix: str  # the start of the replica whose workers to stop


@dataclass(frozen=True)
class WorkerExited:
    replica: str
    store_prefix: str
    rank: int
    exitcode: int | None


@dataclass(frozen=True)
class WorkerHello:
    """A remote worker's first message on its connection back to the head."""

    store_prefix: str
    rank: int


@dataclass(frozen=True)
class RunJob:
    """The head asks an agent to run one job (hexcore/cluster/jobs.py: one of a fixed set of measurements,
    named by its type) in a child process, for at most `timeout_seconds`."""

    job_id: int
    job: object
    timeout_seconds: float


@dataclass(frozen=True)
class JobDone:
    """A job's result, or why it has none (`error`)."""

    job_id: int
    result: object | None
    error: str | None = None
