"""One replica at run time: its scheduler, its worker processes, and the micro-batches in flight
through its pipeline. With S stages and M micro-batches in flight, stage j works on one micro-batch
while stage j+1 works on the one before: every worker runs the steps it is sent in order, so the
overlap needs no more coordination than keeping M steps submitted."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from hexcore.engine.block_manager import BlockManager
from hexcore.config import EngineSpec
from hexcore.executor.deployment import ResolvedReplica
from hexcore.cluster.head import ClusterHead
from hexcore.executor.rendezvous import Rendezvous
from hexcore.executor.messages import PromptScoring, SeqSampling, StepBatch, StepResult
from hexcore.outputs import TokenLogprob
from hexcore.sampling_params import SamplingParams
from hexcore.engine.scheduler import ScheduledSeq, Scheduler
from hexcore.engine.sequence import Sequence
from hexcore.executor.replica_workers import ReplicaWorkers


@dataclass(frozen=True)
class InFlightStep:
    batch: StepBatch
    scheduled: list[ScheduledSeq]
    submitted_at: float
    deadline: float  # still in flight then: a worker has stalled


@dataclass
class ReplicaMetrics:
    """What a replica has done since it started: read by the router and the engine's stats."""

    started_at: float = field(default_factory=time.monotonic)
    num_steps: int = 0
    step_seconds: float = 0.0  # summed submit-to-result latency of the steps
    busy_seconds: float = 0.0  # wall time with at least one step in flight
    num_prompt_tokens: int = 0  # prompt tokens computed (prefill work)
    num_generated_tokens: int = 0
    num_step_tokens: int = 0  # tokens of the completed steps (their expected time scales with it)
    busy_since: float = 0.0

    def step_submitted(self, was_idle: bool) -> None:
        if was_idle:
            self.busy_since = time.monotonic()

    def step_completed(self, step: InFlightStep, is_idle: bool) -> None:
        now = time.monotonic()
        self.num_steps += 1
        self.num_step_tokens += step.batch.num_tokens
        self.step_seconds += now - step.submitted_at
        if is_idle:
            self.busy_seconds += now - self.busy_since


@dataclass(frozen=True)
class SeqResult:
    seq: Sequence
    token: TokenLogprob | None
    prompt_logprobs: list[TokenLogprob] | None


class Replica:
    def __init__(self, plan: ResolvedReplica, engine: EngineSpec, eos_token_ids: tuple[int, ...],
                 rendezvous: Rendezvous, cluster: ClusterHead | None = None):
        self.name = plan.name
        self.plan = plan
        self.engine = engine
        self.eos_token_ids = eos_token_ids
        self.num_micro_batches = plan.num_micro_batches
        self.rendezvous, self.cluster = rendezvous, cluster
        self.workers = ReplicaWorkers(plan.workers, rendezvous, cluster)
        self.num_kv_blocks = plan.num_kv_blocks or 0  # its workers' at each start
        self._new_queues()
        self._next_step_id = 0
        self.metrics = ReplicaMetrics()
        self.step_observers: list[Callable[[StepBatch], None]] = []  # e.g. measurement tools
        self.is_up = False  # its workers answer: the router may send it requests
        self.down_reason: str | None = None
        self.num_restarts = 0
        self.num_resumed = 0  # requests moved from it to other replicas after its failures

    def _new_queues(self) -> None:
        engine = self.engine
        self.block_manager = BlockManager(self.num_kv_blocks, engine.block_size, engine.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, engine.max_num_seqs, engine.max_num_batched_tokens)
        self.in_flight: dict[int, InFlightStep] = {}  # by step id, in the order submitted

    def start(self) -> None:
        self.rejoin(self.started_workers())
        self.metrics = ReplicaMetrics()

    def rejoin(self, workers: ReplicaWorkers) -> None:
        """Up, on these started workers (a restart may size the KV cache anew: the queues are empty then)."""
        assert not self.has_work, "a replica rejoins with nothing in flight or queued"
        self.workers, self.is_up, self.down_reason = workers, True, None
        if workers.num_kv_blocks != self.num_kv_blocks:
            self.num_kv_blocks = workers.num_kv_blocks
            self._new_queues()

    def started_workers(self) -> ReplicaWorkers:
        """New worker processes for this replica, started and warm (the caller's thread waits)."""
        workers = ReplicaWorkers(self.plan.workers, self.rendezvous, self.cluster)
        workers.start(self.plan.num_kv_blocks, self.plan.max_num_kv_blocks)
        try:
            self._warm_up(workers)
        except BaseException:
            workers.kill()
            raise
        return workers

    def _warm_up(self, workers: ReplicaWorkers) -> None:
        """One token through every stage before any request, so that no request pays the workers'
        first-call costs. Its KV lands in block 0, which nothing holds yet and whose next owner writes
        every position before reading it."""
        greedy = SeqSampling(SamplingParams(temperature=0.0, max_tokens=1), seed=0, num_generated=0)
        batch = StepBatch.uniform(1, 1, self.block_manager.block_size, [greedy], step_id=self._take_step_id())
        workers.submit(batch)
        workers.wait_for_result(batch.step_id, timeout=600.0)
        workers.forget(batch.seq_ids)  # a made-up sequence: the first real step drops it

    def fail(self, reason: str) -> list[Sequence]:
        """Mark it down and stop its workers at once. Returns its unfinished sequences, holding no
        blocks, to be recomputed (prompt + tokens so far) wherever they go next."""
        self.is_up, self.down_reason = False, reason
        self.workers.kill()
        seqs = [seq for seq in [*self.scheduler.running, *self.scheduler.waiting] if not seq.is_finished]
        for seq in seqs:
            seq.forget_cache()
        self._new_queues()
        return seqs

    def expected_step_seconds(self, num_tokens: int) -> float:
        """From its own completed steps (0 before any)."""
        m = self.metrics
        return m.step_seconds / m.num_step_tokens * num_tokens if m.num_step_tokens else 0.0

    def stalled_step(self, now: float) -> InFlightStep | None:
        return next((step for step in self.in_flight.values() if now > step.deadline), None)

    def _take_step_id(self) -> int:
        step_id, self._next_step_id = self._next_step_id, self._next_step_id + 1
        return step_id

    @property
    def has_work(self) -> bool:
        return bool(self.in_flight) or self.scheduler.num_unfinished > 0

    def fill_pipeline(self) -> None:
        """Submit micro-batches until M are in flight or nothing more can be scheduled."""
        while len(self.in_flight) < self.num_micro_batches:
            num_active = self.scheduler.num_unfinished
            max_seqs = max(1, -(-num_active // self.num_micro_batches))
            scheduled = self.scheduler.schedule(max_seqs)
            if not scheduled:
                break
            batch = self._build_batch(scheduled)
            self.workers.forget(self.block_manager.take_freed_seq_ids())
            self.workers.submit(batch)
            for observe in self.step_observers:
                observe(batch)
            self.metrics.step_submitted(was_idle=not self.in_flight)
            now = time.monotonic()
            deadline = now + self.engine.stall_timeout_seconds + 4 * self.expected_step_seconds(batch.num_tokens)
            self.in_flight[batch.step_id] = InFlightStep(batch, scheduled, now, deadline)

    def complete(self, result: StepResult) -> list[SeqResult]:
        step = self.in_flight.pop(result.step_id)
        self.metrics.step_completed(step, is_idle=not self.in_flight)
        results = []
        for item, spec, token, prompt_logprobs in zip(step.scheduled, step.batch.sampling, result.tokens,
                                                      result.prompt_logprobs):
            seq = item.seq
            seq.is_in_flight = False
            if seq.is_finished:  # aborted while in flight: its blocks are already free
                continue
            # a sampled row with no token was deferred (its grammar is still compiling): its last token is
            # computed again next step, and sampled then
            seq.num_computed_tokens = item.end - 1 if spec is not None and token is None else item.end
            self.block_manager.register_computed(seq)
            if prompt_logprobs is not None:
                seq.num_prompt_logprobs_done += len(prompt_logprobs)
            self.metrics.num_prompt_tokens += max(0, min(item.end, seq.num_prompt_tokens) - item.start)
            self.metrics.num_generated_tokens += token is not None
            results.append(SeqResult(seq, token, prompt_logprobs))
        return results

    def _build_batch(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        token_ids, sampling, scoring = [], [], []
        for item in scheduled:
            token_ids.extend(item.seq.token_ids(item.start, item.end))
            sampling.append(self._sampling(item.seq) if item.completes_known_tokens else None)
            scoring.append(self._prompt_scoring(item))
        return StepBatch(step_id=self._take_step_id(), seq_ids=[item.seq.seq_id for item in scheduled],
                         token_ids=token_ids, query_lens=[item.num_new_tokens for item in scheduled],
                         context_lens=[item.end for item in scheduled],
                         block_tables=[list(item.seq.block_table) for item in scheduled],
                         sampled=[item.completes_known_tokens for item in scheduled],
                         sampling=sampling, prompt_scoring=scoring)

    def _sampling(self, seq: Sequence) -> SeqSampling:
        params = seq.params
        banned: tuple[int, ...] = ()
        if seq.num_generated < params.min_tokens:
            banned = params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)
        needs_outputs = params.has_penalties or params.grammar is not None
        return SeqSampling(params=params, seed=seq.seed, num_generated=seq.num_generated, banned_token_ids=banned,
                           output_token_ids=tuple(seq.output_token_ids) if needs_outputs else (),
                           prompt_token_ids=tuple(seq.prompt_token_ids) if params.repetition_penalty != 1.0 else (),
                           seq_id=seq.seq_id)

    @staticmethod
    def _prompt_scoring(item: ScheduledSeq) -> PromptScoring | None:
        seq = item.seq
        if not seq.wants_prompt_logprobs:
            return None
        first = max(item.start, seq.num_prompt_logprobs_done)  # the first position still to score from
        last = min(item.end, seq.num_prompt_tokens - 1)  # positions [first, last) predict tokens first+1..last
        if first >= last:
            return None
        return PromptScoring(first - item.start, seq.prompt_token_ids[first + 1 : last + 1], seq.params.prompt_logprobs)
