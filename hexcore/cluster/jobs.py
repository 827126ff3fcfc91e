"""Jobs: short measurements the head asks a node to run on its own host (`hexgen calibrate --nodes`).

A job is a frozen dataclass whose `run()` returns a picklable result. An agent runs only the job types
named in JOBS, a fixed set: the head names a measurement and its parameters, never code, so the agent
is no remote shell. Each job runs in a child process with a time limit; its result (at most
MAX_RESULT_BYTES) or its error goes back to the head as a JobDone. The head runs its own node's jobs
the same way, here (run_here).
"""

from __future__ import annotations

import logging
import pickle
import time

from hexcore.cluster.messages import JobDone, RunJob

JOBS = frozenset({  # module.qualname of every job type an agent runs
    "planning.calibrate.node_jobs.DeviceProfileJob",
    "planning.calibrate.node_jobs.LinkEndpointJob",
})
MAX_RESULT_BYTES = 1 << 20
POLL_SECONDS = 0.05

log = logging.getLogger("hexgen.node")


class JobFailed(RuntimeError):
    """A job ended without a result: it raised, its process died, it overran its time, or its node was lost."""


def job_type_name(job: object) -> str:
    return f"{type(job).__module__}.{type(job).__qualname__}"


class JobProcess:
    """One job in a child process (forked from the workers' forkserver, torch already imported)."""

    def __init__(self, order: RunJob):
        from hexcore.executor.replica_workers import worker_context

        assert job_type_name(order.job) in JOBS, order.job
        self.order = order
        self._deadline = time.monotonic() + order.timeout_seconds
        context = worker_context()
        self._conn, child = context.Pipe(duplex=False)
        self._process = context.Process(target=_job_main, args=(order.job, child), daemon=True,
                                        name=f"hexgen-job-{order.job_id}")
        self._process.start()
        child.close()

    def poll(self) -> JobDone | None:
        """The job's JobDone once it has ended or overrun its time (the process is then gone), else None."""
        if not self._conn.poll() and self._process.is_alive():
            if time.monotonic() < self._deadline:
                return None
            self.kill()
            return self._done(error=f"timed out after {self.order.timeout_seconds:.0f} s")
        try:
            if self._conn.poll():  # its answer, or the end of the pipe when it died without one
                kind, value = pickle.loads(self._conn.recv_bytes(MAX_RESULT_BYTES))
                self._process.join(timeout=5)
                return self._done(value) if kind == "result" else self._done(error=value)
        except OSError:  # longer than MAX_RESULT_BYTES
            self.kill()
            return self._done(error=f"its result is larger than {MAX_RESULT_BYTES} bytes")
        except EOFError:
            pass
        self._process.join(timeout=5)
        return self._done(error=f"its process exited with code {self._process.exitcode} before answering")

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5)
        self._conn.close()

    def _done(self, result: object = None, error: str | None = None) -> JobDone:
        self._conn.close()
        return JobDone(self.order.job_id, result, error)


class NodeJobs:
    """The jobs an agent runs for its head."""

    def __init__(self):
        self._running: dict[int, JobProcess] = {}
        self._refused: list[JobDone] = []

    def start(self, order: RunJob) -> None:
        name = job_type_name(order.job)
        if name not in JOBS:
            log.error("refused job %d: %s is not one of the jobs a node runs", order.job_id, name)
            self._refused.append(JobDone(order.job_id, None, f"{name} is not one of the jobs a node runs"))
            return
        log.info("running job %d: %s", order.job_id, order.job)
        self._running[order.job_id] = JobProcess(order)

    def reap(self) -> list[JobDone]:
        """Every job that has ended (or been refused) since the last call."""
        finished, self._refused = self._refused, []
        for job_id, process in list(self._running.items()):
            done = process.poll()
            if done is not None:
                finished.append(done)
                del self._running[job_id]
        return finished

    def stop_all(self) -> None:
        for process in self._running.values():
            process.kill()
        self._running.clear()


def run_here(job: object, timeout_seconds: float) -> object:
    """Run `job` on this host as an agent would, and return its result (JobFailed says why there is none)."""
    process = JobProcess(RunJob(0, job, timeout_seconds))
    try:
        while (done := process.poll()) is None:
            time.sleep(POLL_SECONDS)
    except BaseException:
        process.kill()
        raise
    if done.error is not None:
        raise JobFailed(f"{type(job).__name__} failed on this host: {done.error}")
    return done.result


def _job_main(job: object, conn) -> None:
    from hexcore.worker.main import _die_with_parent

    _die_with_parent()
    try:
        payload = ("result", job.run())
    except Exception as err:  # noqa: BLE001 - any failure is the job's answer
        payload = ("error", f"{type(err).__name__}: {err}")
    conn.send_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    conn.close()
