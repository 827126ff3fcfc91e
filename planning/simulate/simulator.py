"""A discrete-event simulator of our serving engine, driven by the cost model.

What it models (hexcore's engine, mirrored rule for rule):
- Poisson arrivals (planning.inputs.workload); the router of hexcore/engine/router.py: each request goes
  to the replica with the least expected wait, (queued tokens + the request's tokens) / capacity, among
  replicas whose KV cache can hold it. Queued tokens = uncomputed prompt + remaining output of every
  sequence on the replica; capacity = the cost model's saturated throughput (what `hexgen plan` writes
  as `predicted_throughput_rps`, which the engine's router reads).
- Per replica, hexcore/engine/replica.py `fill_pipeline` and scheduler.py `schedule`: whenever a step
  comes back (or a request arrives) micro-batches are formed until `num_micro_batches` (default: one
  per stage) are in flight, each of at most ceil(unfinished sequences / M) sequences: idle running
  sequences first, oldest first (one decode token, or the next prompt chunk), then waiting requests
  while the `max_num_batched_tokens` budget, `max_num_seqs` and the KV capacity allow. So a queue of
  waiting requests makes the first micro-batch take every idle sequence, as the engine does.
- Pipelined stages: a step occupies stage j for its step time (cost_model.StageCost.step_time), crosses
  the link to stage j+1 (activation_send_time), and after the last stage the sampled tokens return to
  the first stage (one link latency). Stages serve steps first come, first served, so micro-batches
  overlap across stages.
Simplification: a request reserves KV for prompt + output tokens when admitted (the engine preempts
instead; the planner's capacity is the same either way).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from planning.cost.replica_cost import ReplicaCost
from planning.inputs.workload import Request, WorkloadSpec, make_requests


@dataclass(frozen=True)
class Predicted:
    slo_attainment: float
    throughput_rps: float
    p50_latency_s: float
    p99_latency_s: float
    mean_latency_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    p50_tpot_s: float
    p99_tpot_s: float
    num_requests: int
    num_unservable: int  # requests no replica can hold
    # requests finished while requests still arrive, per second of arrivals (throughput_rps also
    # counts draining the queue after the last arrival, which flatters an overloaded plan)
    steady_throughput_rps: float = 0.0

    def summary(self) -> dict:
        """The `predicted` object of `hexgen plan --json` and `hexgen simulate --json`."""
        def figure(value: float) -> float | None:  # no finished request: no latency (JSON null)
            return round(value, 4) if math.isfinite(value) else None

        return {
            "slo_attainment": figure(self.slo_attainment),
            "throughput_rps": figure(self.throughput_rps),
            "p50_latency_s": figure(self.p50_latency_s),
            "p99_latency_s": figure(self.p99_latency_s),
        }


@dataclass(slots=True)
class _Sequence:
    request: Request
    prompt_len: int
    output_len: int
    prefilled: int = 0
    generated: int = 0
    is_in_flight: bool = False
    first_token_time: float = math.nan


@dataclass
class _ReplicaState:
    cost: ReplicaCost
    capacity_rps: float
    stage_free_at: list[float]
    pipeline: list[tuple]  # per stage: step_time, layers, then latency and seconds per token to the next
    running: list[_Sequence] = field(default_factory=list)  # admitted, oldest first
    waiting: deque = field(default_factory=deque)
    in_flight: dict = field(default_factory=dict)  # step id -> [(sequence, new tokens)]
    kv_used: int = 0
    queued_tokens: int = 0  # the router's measure: uncomputed prompt + remaining output of every sequence


def simulate(
    replicas: list[ReplicaCost], workload: WorkloadSpec, requests: list[Request] | None = None,
    capacities: list[float] | None = None,
) -> Predicted:
    """Replay the workload's requests (or `requests`) on the replicas and measure against the SLO.
    `capacities` (req/s) weigh the router; default: the cost model's saturated throughputs."""
    requests = requests if requests is not None else make_requests(workload)
    simulation = _Simulation(replicas, workload, capacities)
    simulation.run(requests)
    return simulation.predicted(requests, workload.slo_seconds)


def simulate_finish_times(replica: ReplicaCost, workload: WorkloadSpec, requests: list[Request]) -> list[float]:
    """When each request served by the replica alone finishes (planning.simulate.capacity reads them)."""
    simulation = _Simulation([replica], workload, [1.0])
    simulation.run(requests)
    return [finish for _, _, finish in simulation.finished]


def _pipeline(cost: ReplicaCost) -> list[tuple]:
    """Per stage: its step-time function, layers, and the transfer after it (the hidden states to the
    next stage; after the last stage, the sampled token ids back to the first: latency only)."""
    model = cost.stages[0].model
    token_bytes = model.hidden_size * model.dtype_bytes
    transfers = [(link.latency_s, token_bytes / link.bytes_per_second) for link in cost.send_links]
    transfers.append((cost.return_link.latency_s if cost.num_stages > 1 else 0.0, 0.0))
    return [(s.step_time, layers, *t) for s, layers, t in zip(cost.stages, cost.layers, transfers)]


class _Simulation:
    def __init__(self, replicas: list[ReplicaCost], workload: WorkloadSpec, capacities: list[float] | None = None):
        if capacities is None:
            p, o, longest = workload.mean_prompt_len, workload.mean_output_len, workload.max_total_len
            capacities = [r.throughput_rps(p, o, longest) for r in replicas]
        self.replicas = [
            _ReplicaState(cost=r, capacity_rps=capacity, stage_free_at=[0.0] * r.num_stages, pipeline=_pipeline(r))
            for r, capacity in zip(replicas, capacities)
        ]
        self.events: list[tuple[float, int, int, int]] = []  # (time, order, replica, step id); replica -1: arrival
        self.order = 0
        self.next_step_id = 0
        self.finished: list[tuple[Request, float, float]] = []  # request, first token time, finish time

    def run(self, requests: list[Request]) -> None:
        for i, request in enumerate(requests):
            self._push(request.arrival, -1, i)
        while self.events:
            now, _, index, key = heapq.heappop(self.events)
            if index < 0:
                self._arrive(requests[key], now)
            else:
                self._step_done(self.replicas[index], index, key, now)

    def _push(self, time: float, index: int, key: int) -> None:
        heapq.heappush(self.events, (time, self.order, index, key))
        self.order += 1

    def _arrive(self, request: Request, now: float) -> None:
        """hexcore's router (hexcore/engine/router.py): among replicas whose KV cache can hold the
        request, the least (queued tokens + this request's tokens) / capacity."""
        need = request.prompt_len + request.output_len
        best, best_wait = -1, math.inf
        for i, r in enumerate(self.replicas):
            if r.cost.kv_capacity_tokens >= need and r.capacity_rps > 0:
                wait = (r.queued_tokens + need) / r.capacity_rps
                if wait < best_wait:
                    best, best_wait = i, wait
        if best < 0:
            return  # unservable: counted as a miss
        replica = self.replicas[best]
        replica.waiting.append(_Sequence(request, request.prompt_len, request.output_len))
        replica.queued_tokens += need
        self._fill(replica, best, now)

    def _step_done(self, replica: _ReplicaState, index: int, step_id: int, now: float) -> None:
        for seq, num_new in replica.in_flight.pop(step_id):
            seq.is_in_flight = False
            replica.queued_tokens -= num_new
            if seq.prefilled < seq.prompt_len:
                seq.prefilled += num_new
                if seq.prefilled == seq.prompt_len:
                    seq.generated, seq.first_token_time = 1, now
            else:
                seq.generated += 1
            if seq.generated >= seq.output_len:
                self.finished.append((seq.request, seq.first_token_time, now))
                replica.kv_used -= seq.prompt_len + seq.output_len
                replica.queued_tokens -= 1  # the sampled token nobody feeds
                replica.running.remove(seq)
        self._fill(replica, index, now)

    def _fill(self, replica: _ReplicaState, index: int, now: float) -> None:
        """hexcore's Replica.fill_pipeline: submit micro-batches until M are in flight, each of at most
        ceil(unfinished sequences / M) sequences."""
        num_micro_batches = replica.cost.num_micro_batches
        while len(replica.in_flight) < num_micro_batches:
            num_active = len(replica.running) + len(replica.waiting)
            batch = self._schedule(replica, max(1, -(-num_active // num_micro_batches)))
            if not batch:
                return
            self._book(replica, index, batch, now)

    def _schedule(self, replica: _ReplicaState, max_seqs: int) -> list[tuple[_Sequence, int]]:
        """hexcore's Scheduler.schedule: idle running sequences first (oldest first: a decode token or
        the next prompt chunk), then waiting ones while the token budget, max_num_seqs and the KV cache
        allow. Simplification: a request reserves KV for prompt + output tokens when admitted (the
        engine grows its blocks and preempts instead)."""
        engine = replica.cost.engine
        budget = engine.max_num_batched_tokens
        batch = []
        num_taken = 0
        for seq in replica.running:
            if num_taken >= max_seqs or budget == 0:
                break
            if seq.is_in_flight:
                continue
            remaining = seq.prompt_len - seq.prefilled  # the prompt left, else the token to feed
            num_new = 1 if remaining <= 0 else remaining if remaining < budget else budget
            batch.append((seq, num_new))
            seq.is_in_flight, budget, num_taken = True, budget - num_new, num_taken + 1
        capacity = replica.cost.kv_capacity_tokens
        while replica.waiting and budget and len(batch) < max_seqs and len(replica.running) < engine.max_num_seqs:
            seq = replica.waiting[0]
            need = seq.prompt_len + seq.output_len
            if replica.kv_used + need > capacity:
                break
            replica.waiting.popleft()
            replica.kv_used += need
            replica.running.append(seq)
            num_new = min(seq.prompt_len, budget)
            batch.append((seq, num_new))
            seq.is_in_flight, budget = True, budget - num_new
        return batch

    def _book(self, replica: _ReplicaState, index: int, batch: list[tuple[_Sequence, int]], now: float) -> None:
        """Book the step through the pipeline's stages (first come, first served) and its return."""
        tokens = pairs = kv_read = sampled = 0
        for seq, num_new in batch:
            prompt_len = seq.prompt_len
            if seq.prefilled < prompt_len:
                tokens += num_new
                pairs += num_new * seq.prefilled + num_new * (num_new + 1) // 2
                kv_read += seq.prefilled + num_new
                sampled += seq.prefilled + num_new == prompt_len
            else:
                context = prompt_len + seq.generated
                tokens, pairs, kv_read, sampled = tokens + 1, pairs + context, kv_read + context, sampled + 1
        time, free_at = now, replica.stage_free_at
        for j, (step_time, layers, send_latency, send_seconds_per_token) in enumerate(replica.pipeline):
            time = (time if time > free_at[j] else free_at[j]) + step_time(layers, tokens, pairs, kv_read, sampled)
            free_at[j] = time
            time += send_latency + tokens * send_seconds_per_token
        step_id, self.next_step_id = self.next_step_id, self.next_step_id + 1
        replica.in_flight[step_id] = batch
        self._push(time, index, step_id)

    def predicted(self, requests: list[Request], slo_seconds: float) -> Predicted:
        num = len(requests)
        if not self.finished:
            return Predicted(0.0, 0.0, *([math.inf] * 7), num, num)
        arrival = np.array([r.arrival for r, _, _ in self.finished])
        first = np.array([f for _, f, _ in self.finished])
        finish = np.array([t for _, _, t in self.finished])
        outputs = np.array([r.output_len for r, _, _ in self.finished])
        e2e, ttft = finish - arrival, first - arrival
        multi = outputs > 1
        tpot = (finish - first)[multi] / (outputs[multi] - 1) if multi.any() else np.zeros(1)
        span = finish.max() - min(r.arrival for r in requests)
        return Predicted(
            slo_attainment=float(np.sum(e2e <= slo_seconds)) / num,
            throughput_rps=float(len(self.finished) / span) if span > 0 else 0.0,
            p50_latency_s=float(np.percentile(e2e, 50)),
            p99_latency_s=float(np.percentile(e2e, 99)),
            mean_latency_s=float(e2e.mean()),
            p50_ttft_s=float(np.percentile(ttft, 50)),
            p99_ttft_s=float(np.percentile(ttft, 99)),
            p50_tpot_s=float(np.percentile(tpot, 50)),
            p99_tpot_s=float(np.percentile(tpot, 99)),
            num_requests=num,
            num_unservable=num - len(self.finished),
            steady_throughput_rps=_steady_throughput(requests, finish),
        )


def _steady_throughput(requests: list[Request], finish: np.ndarray) -> float:
    """Requests finished between the first and the last arrival, per second of that window."""
    first, last = min(r.arrival for r in requests), max(r.arrival for r in requests)
    return float(np.sum(finish <= last)) / (last - first) if last > first else 0.0
