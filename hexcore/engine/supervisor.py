"""Replicas are failure domains. The supervisor notices a replica's failure (a worker that exits,
breaks its pipe, reports an exception, or holds a step past its deadline), takes the replica down
alone, and starts its workers again on the same devices with backoff, in a thread of its own so the
other replicas keep serving. A replica rejoins once it has answered a warm-up step; one that does not
come back after `max_restart_attempts` tries stops the engine (EngineDead), which ends the server
with a non-zero status: a supervisor's cue, instead of serving errors forever.

Moving the failed replica's requests elsewhere is the core's job: `fail` hands them back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hexcore.engine.client import EngineDead
from hexcore.engine.replica import Replica
from hexcore.engine.sequence import Sequence
from hexcore.executor.replica_workers import ReplicaWorkers

log = logging.getLogger("hexgen.engine")

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class Failure:
    replica: Replica
    cause: str  # e.g. "replica 'r1' stage 0 rank 1 (device cpu): killed by SIGKILL"
    step_id: int | None = None  # the step whose computation raised, if one did


class _Restart:
    """One attempt to start a replica's workers again, in its own thread."""

    def __init__(self, replica: Replica, delay: float, wake: Callable[[], None]):
        self.workers: ReplicaWorkers | None = None
        self.error: BaseException | None = None
        self.is_done = False
        self.is_cancelled = False

        def run() -> None:
            time.sleep(delay)
            if not self.is_cancelled:
                try:
                    self.workers = replica.started_workers()
                except BaseException as err:  # noqa: BLE001 - any failure is this attempt's outcome
                    self.error = err
                if self.is_cancelled and self.workers is not None:
                    self.workers.kill()
            self.is_done = True
            wake()

        threading.Thread(target=run, name=f"hexgen-restart-{replica.name}", daemon=True).start()


class Supervisor:
    def __init__(self, replicas: list[Replica], max_restart_attempts: int, wake: Callable[[], None]):
        self.replicas = replicas
        self.max_restart_attempts = max_restart_attempts
        self.wake = wake  # makes the engine loop look at the restarts now
        self._restarts: dict[str, _Restart] = {}
        self._num_attempts: dict[str, int] = {}  # failed attempts since the replica was last up

    @property
    def is_restarting(self) -> bool:
        return bool(self._restarts)

    def stalls(self, now: float) -> list[Failure]:
        """Replicas up whose step is past its deadline, or with a worker on a node the head has lost."""
        failures = []
        for replica in self.replicas:
            lost = replica.workers.lost_node() if replica.is_up and replica.cluster is not None else None
            if lost is not None:
                failures.append(Failure(replica, str(lost)))
                continue
            step = replica.stalled_step(now) if replica.is_up else None
            if step is not None:
                failures.append(Failure(replica, f"replica {replica.name!r}: step {step.batch.step_id} stalled "
                                                 f"({now - step.submitted_at:.1f} s in flight)"))
        return failures

    def next_deadline(self) -> float | None:
        deadlines = [step.deadline for r in self.replicas if r.is_up for step in r.in_flight.values()]
        return min(deadlines, default=None)

    def fail(self, failure: Failure) -> list[Sequence]:
        """Take the replica down and start bringing it back; its unfinished sequences are returned."""
        replica = failure.replica
        log.error("replica %s failed: %s; restarting it", replica.name, failure.cause)
        seqs = replica.fail(failure.cause)
        self._restart(replica)
        return seqs

    def _restart(self, replica: Replica) -> None:
        attempt = self._num_attempts.get(replica.name, 0)
        delay = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** attempt)
        self._restarts[replica.name] = _Restart(replica, delay, self.wake)

    def poll(self) -> list[Replica]:
        """Replicas whose restart has just succeeded (up again); failed attempts are retried with a
        longer backoff. Raises EngineDead when a replica has used up its attempts."""
        rejoined = []
        for replica in self.replicas:
            restart = self._restarts.get(replica.name)
            if restart is None or not restart.is_done:
                continue
            del self._restarts[replica.name]
            if restart.workers is not None:
                replica.rejoin(restart.workers)
                replica.num_restarts += 1
                self._num_attempts[replica.name] = 0
                log.info("replica %s is up again (restart %d)", replica.name, replica.num_restarts)
                rejoined.append(replica)
                continue
            attempts = self._num_attempts[replica.name] = self._num_attempts.get(replica.name, 0) + 1
            replica.down_reason = f"restart {attempts} failed: {restart.error}"
            log.error("replica %s: %s", replica.name, replica.down_reason)
            if attempts >= self.max_restart_attempts:
                raise EngineDead(f"replica {replica.name!r} did not come back after {attempts} restarts: "
                                 f"{restart.error}")
            self._restart(replica)
        return rejoined

    def stop(self) -> None:
        """No replica comes back after this (shutdown)."""
        for restart in self._restarts.values():
            restart.is_cancelled = True
        self._restarts.clear()
