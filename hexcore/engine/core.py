"""The engine proper: requests in, incremental outputs out, over one or more replicas.

`step()` is the whole loop: fill every replica's pipeline (schedule), wait for a step to come back
from a worker (run), then turn sampled tokens into text, stops and outputs (postprocess).
It is synchronous and single-threaded; `LLM` drives it directly, `AsyncEngine` from a thread.

When a replica fails (supervisor.py), its requests move to the replicas still up and resume by
recomputing prompt + the tokens generated so far: their streams go on with no gap or repeat, and the
sampler, stateless per (seed, token index), draws the same tokens. Where no replica can take a
request over, it ends with a retryable error; a request whose own step raised ends with an error.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from hexcore.executor.deployment import ResolvedDeployment
from hexcore.engine.detokenizer import IncrementalDetokenizer
from hexcore.engine.client import EngineOverloaded, EngineStats, EngineUnavailable, ReplicaStats
from hexcore.engine.replica import Replica, SeqResult
from hexcore.engine.router import Router
from hexcore.engine.sequence import Sequence, SequenceStatus
from hexcore.engine.supervisor import Failure, Supervisor
from hexcore.cluster.head import ClusterHead, join_cluster
from hexcore.executor.rendezvous import Rendezvous
from hexcore.executor.replica_workers import WorkerFailure
from hexcore.outputs import ChoiceDelta, RequestError, RequestOutput, TokenLogprob
from hexcore.sampling_params import InvalidParameter, SamplingParams

_STATS_INTERVAL = 1.0


@dataclass
class _Choice:
    """What one choice has produced since its last output."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    is_dirty: bool = False


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    replica: Replica
    choices: list[_Choice]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    is_prompt_logprobs_sent: bool = False
    error: RequestError | None = None

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class EngineCore:
    def __init__(self, deployment: ResolvedDeployment, tokenizer, cluster: ClusterHead | None = None):
        self.deployment = deployment
        self.cluster = cluster  # the other hosts' agents, when the deployment spans hosts
        self.tokenizer = tokenizer
        self.max_model_len = deployment.max_model_len
        eos = tokenizer.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        engine = deployment.config.engine
        self.rendezvous = Rendezvous(cluster.host if cluster is not None else "127.0.0.1")
        self.replicas = [Replica(plan, engine, self.eos_token_ids, self.rendezvous, cluster)
                         for plan in deployment.replicas]
        self.router = Router(self.replicas)
        self._wakeup = Wakeup()
        self.supervisor = Supervisor(self.replicas, engine.max_restart_attempts, self._wakeup.set)
        self.requests: dict[str, _Request] = {}
        self._next_seq_id = 0
        self._stats_requested_at = 0.0
        self._conn_owner: dict[Connection, Replica] = {}

    @classmethod
    def launch(cls, deployment: ResolvedDeployment) -> "EngineCore":
        """The one way an engine comes up: load the tokenizer, wait for the other hosts' agents (a
        deployment across hosts), start every replica's workers."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(deployment.model_dir)
        cluster = join_cluster(deployment.config)
        try:
            core = cls(deployment, tokenizer, cluster)
            core.start()
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
        return core

    # lifecycle
    def start(self) -> None:
        try:
            for replica in self.replicas:
                replica.start()
        except BaseException:
            self.shutdown()
            raise
        self._conn_owner = {conn: r for r in self.replicas for conn in r.workers.conns}

    def shutdown(self) -> None:
        self.supervisor.stop()
        for replica in self.replicas:
            replica.workers.shutdown()
        self.rendezvous.close()
        if self.cluster is not None:
            self.cluster.close()

    def wake(self) -> None:
        """Make a waiting `step()` return now (safe from any thread)."""
        self._wakeup.set()

    # requests
    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or any(r.has_work for r in self.replicas)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self._check_request(prompt_token_ids, params)
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        seqs = []
        for index in range(params.n):
            seqs.append(Sequence(self._next_seq_id, request_id, index, list(prompt_token_ids), params,
                                 seed=base_seed + index, max_tokens=max_tokens))
            self._next_seq_id += 1
        replica = self.router.choose(seqs)
        if replica is None:
            raise EngineUnavailable(self._unavailable_reason(), retry_after_seconds=5.0)
        detokenizers = [IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
                        for _ in seqs]
        self.requests[request_id] = _Request(request_id, list(prompt_token_ids), params, seqs, detokenizers, replica,
                                             [_Choice() for _ in seqs],
                                             [None] if params.prompt_logprobs is not None else None)
        for seq in seqs:
            replica.scheduler.add(seq)

    def _check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Reject what can never be served; return the effective max_tokens."""
        num_prompt = len(prompt_token_ids)
        vocab = self.deployment.dims.vocab_size
        if num_prompt == 0:
            raise InvalidParameter("prompt", "the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidParameter("prompt", f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):  # a worker indexes the vocabulary with them
            raise InvalidParameter("stop_token_ids", f"stop_token_ids must be in [0, {vocab})")
        if num_prompt >= self.max_model_len:
            raise InvalidParameter("prompt", f"the prompt has {num_prompt} tokens, but max_model_len is "
                                             f"{self.max_model_len} (the prompt must leave room for one token)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise InvalidParameter("max_tokens", f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) "
                                                 f"exceeds max_model_len ({self.max_model_len})")
        capacity = max(r.block_manager.capacity_tokens for r in self.replicas)
        if num_prompt + max_tokens > capacity:
            raise InvalidParameter("max_tokens", f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) "
                                                 f"exceeds the KV cache of the largest replica ({capacity} tokens)")
        return max_tokens

    def check_admission(self, num_seqs: int, max_waiting: int) -> None:
        """Raise EngineOverloaded when `num_seqs` more sequences would leave more than `max_waiting`
        waiting beyond the running slots of the replicas up (EngineUnavailable when none is up)."""
        up = [r for r in self.replicas if r.is_up]
        if not up:
            raise EngineUnavailable(self._unavailable_reason(), retry_after_seconds=5.0)
        num_waiting = sum(r.scheduler.num_unfinished for r in up) + num_seqs - sum(r.scheduler.max_num_seqs for r in up)
        if num_waiting > max_waiting:
            raise EngineOverloaded(f"{num_waiting} sequences would wait (at most {max_waiting}); retry later")

    def _unavailable_reason(self) -> str:
        down = "; ".join(f"{r.name}: {r.down_reason}" for r in self.replicas if not r.is_up)
        return f"no replica is up ({down})"

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq, choice in zip(request.seqs, request.choices):
            if not seq.is_finished:
                request.replica.scheduler.finish(seq, "abort")
                choice.finish_reason, choice.is_dirty = "abort", True
        return self._output(request)

    # the loop
    def step(self, timeout: float | None = None, wait_when_idle: bool = False) -> list[RequestOutput]:
        """Schedule, wait up to `timeout` for results (or for `wake()`), postprocess. With nothing in
        flight it returns at once unless `wait_when_idle`. Failed replicas are taken down and their
        requests moved; restarted ones rejoin."""
        for replica in self.supervisor.poll():
            self._conn_owner.update({conn: replica for conn in replica.workers.conns})
        for replica in self._up_replicas():
            self._guarded(replica, replica.fill_pipeline)
        self._maybe_request_worker_stats()
        now = time.monotonic()
        for failure in self.supervisor.stalls(now):
            self._fail(failure)
        deadline = self.supervisor.next_deadline()
        if deadline is not None:
            timeout = max(0.0, deadline - now) if timeout is None else min(timeout, max(0.0, deadline - now))
        if not any(r.in_flight for r in self.replicas) and not wait_when_idle and not self.supervisor.is_restarting:
            return self._collect_outputs()
        watched = [*self._conn_owner, self._wakeup]
        for conn in wait(watched, timeout=timeout):
            replica = self._conn_owner.get(conn)
            if replica is None or not replica.is_up:
                continue  # a wake-up, or a worker of a replica that failed in this round
            try:
                result = replica.workers.receive(conn)
            except WorkerFailure as err:
                self._fail(Failure(replica, str(err), err.step_id))
                continue
            if result is not None:
                for seq_result in replica.complete(result):
                    self._postprocess(seq_result)
                self._guarded(replica, replica.fill_pipeline)  # refill at once: keep the stages busy
        self._wakeup.clear()
        return self._collect_outputs()

    def _up_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.is_up]

    def _guarded(self, replica: Replica, action) -> None:
        try:
            action()
        except WorkerFailure as err:
            self._fail(Failure(replica, str(err), err.step_id))

    def _fail(self, failure: Failure) -> None:
        """Take the replica down; move each of its requests to a replica up, or end it with an error."""
        replica = failure.replica
        step = replica.in_flight.get(failure.step_id) if failure.step_id is not None else None
        raised_on = {item.seq.request_id for item in step.scheduled} if step is not None else set()
        seqs = self.supervisor.fail(failure)
        self._conn_owner = {conn: r for conn, r in self._conn_owner.items() if r is not replica}
        by_request: dict[str, list[Sequence]] = {}
        for seq in seqs:
            by_request.setdefault(seq.request_id, []).append(seq)
        for request_id, moved in by_request.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request_id in raised_on:
                self._end_with_error(request, RequestError(f"computing it failed: {failure.cause}", False))
                continue
            target = self.router.choose(moved)
            if target is None:
                self._end_with_error(request, RequestError(self._unavailable_reason(), True))
                continue
            request.replica = target
            target.scheduler.add_resumed(moved)
            replica.num_resumed += 1

    @staticmethod
    def _end_with_error(request: _Request, error: RequestError) -> None:
        request.error = error
        for seq, choice in zip(request.seqs, request.choices):
            if not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
                choice.finish_reason, choice.is_dirty = "abort", True

    def _postprocess(self, result: SeqResult) -> None:
        seq = result.seq
        request = self.requests.get(seq.request_id)
        if request is None:
            return
        if result.prompt_logprobs:
            request.prompt_logprobs.extend(result.prompt_logprobs)
        if result.token is None:
            return
        params, choice = seq.params, request.choices[seq.index]
        token_id = result.token.token_id
        seq.output_token_ids.append(token_id)
        choice.token_ids.append(token_id)
        choice.is_dirty = True
        if params.logprobs is not None:
            choice.logprobs.append(result.token)
        detokenizer = request.detokenizers[seq.index]
        reason = None
        # a grammar allows eos only where the output is complete: then eos ends it even with ignore_eos
        is_eos = token_id in self.eos_token_ids and (not params.ignore_eos or params.grammar is not None)
        if token_id in params.stop_token_ids or is_eos:
            reason = "stop"
        elif detokenizer.append(token_id) is not None:
            reason = "stop"
        elif seq.num_generated >= seq.max_tokens:
            reason = "length"
        choice.text += detokenizer.take_new_text(is_final=reason is not None)
        if reason is not None:
            choice.finish_reason = reason
            request.replica.scheduler.finish(seq, reason)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for request in list(self.requests.values()):
            if not any(choice.is_dirty for choice in request.choices):
                continue
            if (request.error is None and request.prompt_logprobs is not None
                    and len(request.prompt_logprobs) < len(request.prompt_token_ids)):
                continue  # the first output carries the whole prompt's scores
            outputs.append(self._output(request))
            if request.is_finished:
                del self.requests[request.request_id]
        return outputs

    def _output(self, request: _Request) -> RequestOutput:
        deltas = []
        for index, choice in enumerate(request.choices):
            if choice.is_dirty:
                deltas.append(ChoiceDelta(index, choice.token_ids, choice.text,
                                          choice.logprobs if request.params.logprobs is not None else None,
                                          choice.finish_reason))
                request.choices[index] = _Choice(finish_reason=choice.finish_reason)
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.is_prompt_logprobs_sent:
            prompt_logprobs, request.is_prompt_logprobs_sent = request.prompt_logprobs, True
        return RequestOutput(request.request_id, len(request.prompt_token_ids), deltas,
                             is_finished=request.is_finished, prompt_logprobs=prompt_logprobs,
                             replica=request.replica.name, error=request.error,
                             num_cached_tokens=max(seq.num_cached_tokens or 0 for seq in request.seqs))

    # stats
    def _maybe_request_worker_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_requested_at >= _STATS_INTERVAL:
            self._stats_requested_at = now
            for replica in self._up_replicas():
                self._guarded(replica, replica.workers.request_stats)

    def collect_worker_stats(self) -> None:
        """Refresh every worker's stats now (only while idle: results must not be in flight)."""
        assert not any(r.in_flight for r in self.replicas), "collect_worker_stats() needs an idle engine"
        for replica in self._up_replicas():
            for conn in replica.workers.conns:  # drop replies to earlier periodic requests
                while conn.poll(0.05):
                    replica.workers.receive(conn)
            replica.workers.request_stats()
            for conn in replica.workers.conns:
                replica.workers.receive(conn)

    def stats(self) -> EngineStats:
        now = time.monotonic()
        replicas = []
        for r in self.replicas:
            m = r.metrics
            wall = max(1e-9, now - m.started_at)
            busy = [max((r.workers.stats[rank].busy_seconds for rank in stage.ranks if rank in r.workers.stats),
                        default=0.0) / wall for stage in r.plan.workers[0].stages]
            replicas.append(ReplicaStats(
                name=r.name, num_running=len(r.scheduler.running), num_waiting=len(r.scheduler.waiting),
                num_kv_blocks_used=r.block_manager.num_used_blocks, num_kv_blocks_total=r.block_manager.num_blocks,
                num_preemptions=r.scheduler.num_preemptions, num_prompt_tokens=m.num_prompt_tokens,
                num_generated_tokens=m.num_generated_tokens, num_steps=m.num_steps,
                mean_step_seconds=m.step_seconds / max(1, m.num_steps), stage_busy_fraction=busy,
                is_up=r.is_up, down_reason=r.down_reason, num_restarts=r.num_restarts, num_resumed=r.num_resumed))
        return EngineStats(replicas)


class Wakeup:
    """A pipe the engine loop waits on beside the worker pipes; any thread may set it."""

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
